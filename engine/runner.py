"""Executes step plans on one rank: KV transfer ops, then the forward pass through this PP stage.

Stage 0 embeds the tokens; each stage passes its hidden states to the next with point-to-point
send/recv; the last stage's TP rank 0 samples and returns the tokens to the leader.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from engine.batch import build_batch
from engine.comm import TAG_TOKENS, RankContext, poll
from engine.kv_cache import KVCache
from engine.kv_transfer import KVTransfer
from engine.model import LlamaStage, rope_tables
from engine.reshard import stage_layers
from engine.sampling import sample
from engine.step import StepPlan
from engine.weights import load_stage
from launcher.model_files import ModelShape

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelRunner:
    def __init__(self, ctx: RankContext, shape: ModelShape, model_dir: str, dtype: str, num_blocks: int,
                 block_size: int, max_model_len: int):
        inst = ctx.instance
        self.ctx, self.shape = ctx, shape
        self.dtype = DTYPES[dtype]
        l0, l1 = stage_layers(shape.num_layers, inst.pp, ctx.pp_stage)
        started = time.time()
        self.stage = LlamaStage(shape, l0, l1, ctx.is_first_stage, ctx.is_last_stage, inst.tp,
                                ctx.tp_group, self.dtype)
        load_stage(self.stage, model_dir, shape, ctx.tp_rank, inst.tp)
        self.stage.to(device=ctx.device, dtype=self.dtype).eval()
        self.load_s = time.time() - started
        kv_heads = shape.num_kv_heads // inst.tp
        self.cache = KVCache(l1 - l0, num_blocks, block_size, kv_heads, shape.head_dim, self.dtype, ctx.device)
        self.kv = KVTransfer(ctx, self.cache, shape, l0, ctx.tp_rank * kv_heads)
        self.cos, self.sin = rope_tables(shape, max_model_len)
        self.cos, self.sin = self.cos.to(self.dtype), self.sin.to(self.dtype)

    @torch.inference_mode()
    def execute(self, step: StepPlan):
        """Runs one step. On the leader returns (tokens, logits or None); elsewhere None."""
        for send in step.kv_sends:
            self.kv.post_sends(send.req_id, send.block_table, send.num_tokens, send.peer_instance)
        for recv in step.kv_recvs:
            self.kv.post_recvs(recv.req_id, recv.num_tokens, recv.peer_instance)
        for join in step.kv_joins:
            self.kv.join(join.req_id, join.block_table)
        for req_id in step.kv_releases:
            self.kv.release(req_id)
        if not step.has_forward:
            return ([], None) if self.ctx.is_leader else None
        ctx = self.ctx
        batch = build_batch(step.seqs, self.cache.block_size, self.cos, self.sin)
        if ctx.is_first_stage:
            x = batch.token_ids.to(ctx.device)
        else:
            x = torch.empty((batch.num_tokens, self.shape.hidden_size), dtype=self.dtype, device=ctx.device)
            dist.recv(x, ctx.stage_rank(ctx.pp_stage - 1))
        out = self.stage(x, batch, self.cache.k, self.cache.v)
        if not ctx.is_last_stage:
            dist.send(out.contiguous(), ctx.stage_rank(ctx.pp_stage + 1))
            return self._tokens_from_last_stage() if ctx.is_leader else None
        if ctx.tp_rank != 0:
            return None
        logits = out.float()
        tokens = sample(logits, [s.sampling for s in step.seqs], [s.output_index for s in step.seqs])
        result = (tokens, logits if step.want_logits else None)
        if ctx.is_leader:
            return result
        ctx.instance_comm.send(result, dest=0, tag=TAG_TOKENS)
        return None

    def _tokens_from_last_stage(self):
        return poll(self.ctx.instance_comm, source=self.ctx.instance.size - self.ctx.instance.tp, tag=TAG_TOKENS)
