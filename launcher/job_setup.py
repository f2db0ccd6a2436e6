"""The set-up every command shares: the cluster's hosts, the model directory, the plan, each
instance's token budgets, the job file and the command that starts the ranks.

Data flows one way: config -> plan -> job file -> launch command -> ranks. Every user mistake ends
as a UserError before any rank starts. No torch here.
"""
from __future__ import annotations

import os

from contracts.batch_io import read_requests, write_checked
from contracts.config import JobConfig
from contracts.errors import UserError
from contracts.hostfile import Host, hosts_from_slurm, read_hostfile
from contracts.job_file import JobFile
from contracts.plan import Plan, check_layouts, map_onto_allocation, plan_from_config, read_plan, write_plan
from launcher import rank_launch
from launcher.model_files import embedded_gguf, read_shape, resolve_model_dir
from launcher.network import LOCAL_NAMES, check_hosts_resolve, rendezvous_address
from launcher.planner.latency import prefill_token_budget
from launcher.run_files import writable_run_dir
from launcher.supervise import launch


def cluster_hosts(cfg: JobConfig) -> list[Host]:
    """Hosts of the Slurm allocation when inside one, else the config's hostfile."""
    return hosts_from_slurm(os.environ) or read_hostfile(cfg.resolve(cfg.cluster.hostfile))


def in_slurm_allocation() -> bool:
    return hosts_from_slurm(os.environ) is not None


def check_hosts(cfg: JobConfig, plan: Plan) -> None:
    """Before a real launch outside Slurm (whose nodes are known to it): every planned host resolves.
    Where the first instance rank (the rendezvous' host, engine/control_plane.py) runs here, the
    address it will choose is one remote ranks can reach."""
    hosts = plan.rank_hosts()
    if not in_slurm_allocation():
        source = f"plan {cfg.placement.plan}" if cfg.placement.plan else f"hostfile {cfg.cluster.hostfile}"
        check_hosts_resolve(hosts, source)
    if hosts[plan.instances[0].first_rank] in LOCAL_NAMES and not cfg.cluster.interface:
        rendezvous_address(cfg.cluster.master_addr, cfg.cluster.interface, hosts)


def model_dir_of(cfg: JobConfig) -> str:
    """The HF directory the ranks load (a GGUF file or the embedded default converted once)."""
    return resolve_model_dir(cfg.model.path if cfg.model.path == "embedded" else cfg.resolve(cfg.model.path))


def served_model_name(cfg: JobConfig) -> str:
    """The model's name in the API and in batch results: serve.model_name, else the model file's or
    directory's name."""
    if cfg.serve.model_name:
        return cfg.serve.model_name
    path = embedded_gguf() if cfg.model.path == "embedded" else cfg.resolve(cfg.model.path)
    return os.path.basename(path.rstrip("/")).removesuffix(".gguf")


def build_plan(cfg: JobConfig, hosts: list[Host], model_dir: str) -> Plan:
    shape = read_shape(model_dir)
    if cfg.placement.plan:
        plan = read_plan(cfg.resolve(cfg.placement.plan))
        if in_slurm_allocation():
            plan = map_onto_allocation(plan, hosts)
        check_layouts(plan, shape, hosts, key="plan")
    elif cfg.placement.mode == "auto":
        from launcher.auto_plan import plan_at_launch
        plan = plan_at_launch(cfg, hosts, shape)
        check_layouts(plan, shape, hosts, key="plan")
    else:
        plan = plan_from_config(cfg, hosts)
        check_layouts(plan, shape)
    if cfg.model.max_model_len > shape.max_position_embeddings:
        raise UserError(f"config: 'model.max_model_len' = {cfg.model.max_model_len} exceeds the model's "
                        f"{shape.max_position_embeddings} positions; lower it")
    return plan


def instance_token_budgets(cfg: JobConfig, plan: Plan) -> tuple[int, ...]:
    """Each instance's L_m: `scheduler.prefill_token_budget` when a number; auto: the planner
    profile's for the instance's TP degree (the colocated profile for colocated instances), the
    same value the simulator uses. A chunked colocated instance's budget is per step:
    `scheduler.step_token_budget` when a number, else the one its plan gives (the planner's
    pick), else its L_m."""
    s = cfg.scheduler
    configured = s.token_budget
    if configured is not None or not cfg.planner.profile:
        disagg = colo = None
    else:
        from launcher.planner.config_to_plan import latency_models

        disagg, colo = latency_models(cfg, check_dtype=False)
    configured_step = s.step_token_budget if s.step_token_budget != "auto" else None

    def step_budget(inst) -> int | None:
        if inst.role != "colocated" or s.colocated_policy != "chunked":
            return None
        return configured_step or inst.step_token_budget

    return tuple(step_budget(inst) or prefill_token_budget(configured, colo if inst.role == "colocated" else disagg, inst.tp)
                 for inst in plan.instances)


CHECKED_REQUESTS = "checked_requests.jsonl"  # in the run directory: what rank 0 runs (generate, bench)


def checked_requests(input_path: str, run_dir: str) -> str:
    """An input the launcher made itself (a bench trace, the calibration probe) checked as a user's
    is, into RUN_DIR/checked_requests.jsonl: the file rank 0 runs. The run directory is owned first."""
    return write_checked(read_requests(input_path), os.path.join(writable_run_dir(run_dir), CHECKED_REQUESTS))


def new_job(cfg: JobConfig, plan: Plan, model_dir: str, **fields) -> JobFile:
    """The job file of a plan, with each instance's token budgets worked out here (the ranks read them)."""
    return JobFile(cfg, plan, model_dir, token_budgets=instance_token_budgets(cfg, plan), **fields)


def launch_command(job: JobFile, run_dir: str, launcher: str = "mpirun",
                   files: dict | None = None) -> tuple[list[str], dict]:
    """Writes the job file every rank reads (and the plan beside it, for people) into the run
    directory this launcher owns; returns the command (and environment) that starts the ranks with
    the chosen launcher. With `files` (a dry run) nothing is written: the command's own files
    (rankfile, hostfile) go into `files`."""
    job_path = os.path.join(run_dir, "job.json")
    if files is None:
        writable_run_dir(run_dir)  # a no-op when already owned
        job.write(job_path)
        write_plan(job.plan, os.path.join(run_dir, "plan.yaml"))
    hosts, env = job.plan.rank_hosts(), {}
    interface = job.config.cluster.interface
    if launcher == "deepspeed":
        cmd = rank_launch.deepspeed_command(hosts, job_path, run_dir, interface, files=files)
        if job.config.cluster.device == "cpu":  # on GPUs DeepSpeed's own accelerator (CUDA) stays
            env["DS_ACCELERATOR"] = "cpu"
    elif launcher == "srun":
        cmd, env = rank_launch.srun_command(hosts, job_path, run_dir, interface, files=files)
    else:
        cmd = rank_launch.mpirun_command(hosts, job_path, run_dir, interface, files=files)
    return cmd, env


def run_job(job: JobFile, run_dir: str, what: str) -> None:
    """Starts a job on its own (profile and bench runs) and waits for it; a failure is a UserError."""
    cmd, env = launch_command(job, run_dir)
    rc = launch(cmd, job.plan, env)
    if rc != 0:
        raise UserError(f"{what} failed (exit {rc}); see its messages above", exit_code=rc)


