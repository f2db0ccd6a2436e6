"""Executes step plans on one rank: KV transfer ops, then the forward pass through this PP stage.

Stage 0 embeds the tokens; each stage passes its hidden states to the next with point-to-point
send/recv; the last stage's TP rank 0 samples and returns the tokens to the leader. With PP > 1
a step's sequences run as up to PP micro-batches, so the stages work at the same time within a
step; and the leader (stage 0) may `launch` the next step before it `collect`s the tokens of the
previous one (batches in flight), so stage 0 works on one step while later stages finish another.
Every rank executes the steps in the same order, and the tokens come back in that order.
PDLAUNCH_STEP_TRACE=DIR makes every rank append each forward's (step, stage, start, end, in_flight:
the earlier steps whose tokens this rank had not taken when it launched this one; only the leader
takes tokens) to DIR/rank<R>.jsonl, to see the stages overlap.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from contracts.model_shape import ModelShape
from contracts.protocol import StageTokens, StepPlan
from engine.batch import build_batch
from engine.control_plane import RankContext, isend, receive
from engine.data_plane import dist_rank
from engine.kv_cache import KVCache
from engine.kv_transfer import KVTransfer
from engine.model import LlamaStage
from engine.reshard import stage_layers
from engine.rope import rope_tables
from engine.sampling import sample
from engine.weights import load_stage

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Launched:
    """A step whose forward has left this rank; the leader collects its tokens later."""

    step: StepPlan
    chunks: int                      # micro-batches, one StageTokens each
    results: list                    # StageTokens already at hand (the leader is the last stage)


class ModelRunner:
    def __init__(self, ctx: RankContext, shape: ModelShape, model_dir: str, dtype: str, num_blocks: int,
                 block_size: int, max_model_len: int, steps_in_flight: int = 1):
        inst = ctx.instance
        self.ctx, self.shape = ctx, shape
        # Micro-batches per step: PP when each step fills and drains the pipeline; one when steps
        # overlap (batches in flight), where splitting a decode batch further would only make each
        # stage stream its weights more often per token.
        self.split = inst.pp if steps_in_flight == 1 else 1
        self.dtype = DTYPES[dtype]
        l0, l1 = stage_layers(shape.num_layers, inst.pp, ctx.pp_stage)
        started = time.time()
        self.stage = LlamaStage(shape, l0, l1, ctx.is_first_stage, ctx.is_last_stage, inst.tp,
                                ctx.tp_group, self.dtype)
        load_stage(self.stage, model_dir, shape, ctx.tp_rank, inst.tp)
        self.stage.to(device=ctx.device, dtype=self.dtype).eval()
        self.stage.prepare_weights()
        self.load_s = time.time() - started
        kv_heads = shape.num_kv_heads // inst.tp
        self.cache = KVCache(l1 - l0, num_blocks, block_size, kv_heads, shape.head_dim, self.dtype, ctx.device)
        self.kv = KVTransfer(ctx, self.cache, shape, l0, ctx.tp_rank * kv_heads, ctx.kv_group)
        self.cos, self.sin = rope_tables(shape, max_model_len, ctx.device, self.dtype)
        self.launched = 0
        self.uncollected = 0   # the leader: steps launched with a forward whose tokens it has not taken
        self.token_sends = []  # the last stage's TOKENS isends not known to be complete
        trace_dir = os.environ.get("PDLAUNCH_STEP_TRACE")
        self.trace = open(os.path.join(trace_dir, f"rank{ctx.rank}.jsonl"), "a", buffering=1) if trace_dir else None
        pairs = self.kv.warm_up()  # every KV peer met once, in one global order, before any step
        if self.trace and pairs:
            self.trace.write(json.dumps({"kv_warm_up": pairs, "end": time.time()}) + "\n")

    def execute(self, step: StepPlan):
        """Runs one step to its end. On the leader returns (tokens, logits as lists or None);
        elsewhere None."""
        return self.collect(self.launch(step))

    @torch.inference_mode()
    def launch(self, step: StepPlan) -> Launched:
        """Posts the step's KV ops and runs its forward through this stage (sending the hidden
        states on, or the last stage's tokens to the leader)."""
        self.launched += 1
        for send in step.kv_sends:
            self.kv.post_sends(send.req_id, send.block_table, send.num_tokens, send.peer_instance, send.peer_blocks)
        for recv in step.kv_recvs:
            self.kv.post_recvs(recv.req_id, recv.block_table, recv.num_tokens, recv.peer_instance, recv.peer_blocks)
        for req_id in step.kv_joins:
            self.kv.join(req_id)
        for req_id in step.kv_releases:
            self.kv.release(req_id)
        if not step.has_forward:
            return Launched(step, 0, [])
        ctx = self.ctx
        in_flight = self.uncollected
        self.uncollected += ctx.is_leader
        chunks = micro_batches(step.seqs, self.split)
        # Never wait for them here: a large one (--dump-logits) completes only once the leader
        # receives it, and the leader may first be sending this rank the next step's activations.
        self.token_sends = [request for request in self.token_sends if not request.Test()]
        results = []
        for chunk in chunks:  # stage s works on chunk k while stage s+1 works on chunk k-1
            started = time.time()
            out = self._forward(chunk)
            if self.trace:
                self.trace.write(json.dumps({"step": self.launched, "stage": ctx.pp_stage, "start": started,
                                             "end": time.time(), "in_flight": in_flight}) + "\n")
            if out is None:
                continue
            logits = out.float()
            tokens = sample(logits, [s.sampling for s in chunk], [s.output_index for s in chunk])
            result = StageTokens(tuple(tokens), tuple(logits.tolist()) if step.want_logits else None)
            if ctx.is_leader:
                results.append(result)
            else:  # non-blocking: this stage must go on receiving the next chunk
                self.token_sends.append(isend(ctx.instance_comm, result, 0))
        return Launched(step, len(chunks), results)

    def finish(self) -> None:
        """Completes this rank's outstanding sends of tokens (before the rank ends)."""
        for request in self.token_sends:
            request.wait()
        self.token_sends = []

    def collect(self, launched: Launched):
        """The leader: the launched step's tokens (and logits as lists or None), waiting for the
        last stage if needed. Other ranks: None."""
        if not self.ctx.is_leader:
            return None
        self.uncollected -= launched.chunks > 0
        results = launched.results or [self._tokens_from_last_stage() for _ in range(launched.chunks)]
        tokens = [t for r in results for t in r.tokens]
        logits = [row for r in results for row in r.logits] if launched.step.want_logits else None
        return tokens, logits

    def _forward(self, seqs):
        """One micro-batch through this stage; the last stage's TP rank 0 gets its logits."""
        ctx = self.ctx
        batch = build_batch(seqs, self.cache.block_size, self.cos, self.sin, self.shape.sliding_window)
        if ctx.is_first_stage:
            x = batch.token_ids
        else:
            x = torch.empty((batch.num_tokens, self.shape.hidden_size), dtype=self.dtype, device=ctx.device)
            dist.recv(x, dist_rank(ctx.plan, ctx.stage_rank(ctx.pp_stage - 1)))
        out = self.stage(x, batch, self.cache.k, self.cache.v)
        if not ctx.is_last_stage:
            dist.send(out.contiguous(), dist_rank(ctx.plan, ctx.stage_rank(ctx.pp_stage + 1)))
            return None
        return out if ctx.tp_rank == 0 else None

    def _tokens_from_last_stage(self):
        return receive(self.ctx.instance_comm, self.ctx.instance.size - self.ctx.instance.tp, (StageTokens,))


def micro_batches(seqs: list, pp: int) -> list[list]:
    """Splits a step's sequences into up to `pp` contiguous micro-batches of similar token counts,
    so that all PP stages work at once. Every rank computes the same split."""
    n = min(pp, len(seqs))
    total = sum(len(s.token_ids) for s in seqs)
    chunks, current, acc = [], [], 0
    for i, seq in enumerate(seqs):
        current.append(seq)
        acc += len(seq.token_ids)
        still_needed = n - len(chunks) - 1
        if still_needed > 0 and (acc >= total * (len(chunks) + 1) / n or len(seqs) - i - 1 == still_needed):
            chunks.append(current)
            current = []
    if current:
        chunks.append(current)
    return chunks
