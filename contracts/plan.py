"""Placement plans: which global ranks form which instance, with what role and TP x PP layout.

Global rank 0 is the controller (a light process that needs no slot or GPU: it rides along on
the first host). Instances follow with contiguous rank ranges; inside an instance TP varies
fastest, then PP (Megatron order): local index = pp_stage * tp + tp_rank.
A plan is plain data, written to and read from YAML; the engine runs it as it is.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import yaml

from contracts.config import JobConfig
from contracts.errors import UserError
from contracts.hostfile import Host
from contracts.model_shape import ModelShape
from contracts.protocol import CONTROLLER

INSTANCE_ROLES = ("prefill", "decode", "colocated")


@dataclass
class InstancePlan:
    id: int
    role: str
    tp: int
    pp: int
    first_rank: int
    hosts: list[str] = field(default_factory=list)  # host of each local rank, Megatron order
    step_token_budget: int | None = None  # chunked colocated: tokens per step the planner chose

    @property
    def size(self) -> int:
        return self.tp * self.pp

    @property
    def ranks(self) -> list[int]:
        return list(range(self.first_rank, self.first_rank + self.size))

    @property
    def leader(self) -> int:
        """The rank that schedules the instance: TP rank 0 of PP stage 0."""
        return self.first_rank

    def rank_of(self, tp_rank: int, pp_stage: int) -> int:
        return self.first_rank + pp_stage * self.tp + tp_rank

    def coords(self, rank: int) -> tuple[int, int]:
        """(tp_rank, pp_stage) of a global rank of this instance."""
        local = rank - self.first_rank
        return local % self.tp, local // self.tp

    def to_dict(self) -> dict:
        out = {"id": self.id, "role": self.role, "tp": self.tp, "pp": self.pp, "ranks": self.ranks, "hosts": self.hosts}
        if self.step_token_budget:
            out["step_token_budget"] = self.step_token_budget
        return out


@dataclass
class Plan:
    instances: list[InstancePlan]
    controller_host: str = "localhost"
    predicted: dict = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return 1 + sum(i.size for i in self.instances)

    def instance_of(self, rank: int) -> InstancePlan | None:
        for inst in self.instances:
            if inst.first_rank <= rank < inst.first_rank + inst.size:
                return inst
        return None

    def by_role(self, *roles: str) -> list[InstancePlan]:
        return [i for i in self.instances if i.role in roles]

    def rank_hosts(self) -> list[str]:
        """Host of every global rank, controller first."""
        return [self.controller_host] + [h for inst in self.instances for h in inst.hosts]

    def instance_ranks_by_host(self) -> Counter:
        """How many instance ranks (devices) the plan puts on each host; the controller rank is extra."""
        return Counter(h for inst in self.instances for h in inst.hosts)

    def ranks_per_host(self) -> int:
        """The most instance ranks the plan puts on one host."""
        return max(self.instance_ranks_by_host().values())

    def describe_rank(self, rank: int) -> str:
        if rank == CONTROLLER:
            return "the controller"
        inst = self.instance_of(rank)
        if inst is None:
            return "outside the plan"
        tp, pp = inst.coords(rank)
        return f"{inst.role} instance {inst.id} (TP rank {tp}, PP stage {pp})"

    def to_dict(self) -> dict:
        return {"world_size": self.world_size,
                "controller": {"rank": CONTROLLER, "host": self.controller_host},
                "instances": [i.to_dict() for i in self.instances],
                "predicted": self.predicted}


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def plan_from_dict(data: dict, source: str = "plan") -> Plan:
    """Reads a plan, checking that ranks are contiguous and in Megatron order."""
    if not isinstance(data, dict) or not isinstance(data.get("instances"), list) or not data["instances"]:
        raise UserError(f"{source}: expected a mapping with a non-empty 'instances' list "
                        "(write one with `pdlaunch plan CONFIG -o plan.yaml`)")
    instances = []
    next_rank = CONTROLLER + 1
    for n, item in enumerate(data["instances"]):
        where = f"{source}: instances[{n}]"
        if not isinstance(item, dict):
            raise UserError(f"{where} must be a mapping with role, tp, pp, ranks")
        unknown = set(item) - {"id", "role", "tp", "pp", "ranks", "hosts", "predicted", "step_token_budget"}
        if unknown:
            raise UserError(f"{where}: unknown key '{sorted(unknown)[0]}'; valid: role, tp, pp, ranks, hosts, "
                            "step_token_budget")
        role = item.get("role")
        if role not in INSTANCE_ROLES:
            raise UserError(f"{where}.role must be one of {', '.join(INSTANCE_ROLES)}, got {role!r}")
        tp, pp = item.get("tp", 1), item.get("pp", 1)
        for key, value in (("tp", tp), ("pp", pp)):
            if not _positive_int(value):
                raise UserError(f"{where}.{key} must be a positive integer, got {value!r}")
        ranks = item.get("ranks", list(range(next_rank, next_rank + tp * pp)))
        if ranks != list(range(next_rank, next_rank + tp * pp)):
            raise UserError(f"{where}.ranks must be the {tp * pp} consecutive ranks starting at "
                            f"{next_rank} (TP fastest, then PP), got {ranks!r}")
        hosts = item.get("hosts", ["localhost"] * (tp * pp))
        if not isinstance(hosts, list) or len(hosts) != tp * pp:
            raise UserError(f"{where}.hosts must list one host per rank ({tp * pp}), got {hosts!r}")
        step = item.get("step_token_budget")
        if step is not None and (role != "colocated" or not _positive_int(step)):
            raise UserError(f"{where}.step_token_budget must be a positive integer on a colocated instance, got {step!r}")
        instances.append(InstancePlan(n, role, tp, pp, next_rank, [str(h) for h in hosts], step))
        next_rank += tp * pp
    controller = data.get("controller") or {}
    plan = Plan(instances, str(controller.get("host", instances[0].hosts[0])), data.get("predicted") or {})
    roles = {i.role for i in instances}
    if "colocated" in roles and roles != {"colocated"}:
        raise UserError(f"{source}: mixes colocated with prefill/decode instances; use one mode per plan")
    if roles & {"prefill", "decode"} and roles != {"prefill", "decode"}:
        raise UserError(f"{source}: a disaggregated plan needs at least one prefill and one decode instance")
    if "world_size" in data and data["world_size"] != plan.world_size:
        raise UserError(f"{source}: world_size {data['world_size']} does not match its instances "
                        f"({plan.world_size} = 1 controller + instance ranks)")
    return plan


def read_plan(path: str) -> Plan:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"plan file '{path}' not found; create it with `pdlaunch plan CONFIG -o {path}`") from None
    except yaml.YAMLError as e:
        raise UserError(f"plan file '{path}' is not valid YAML ({getattr(e, 'problem', e)})") from None
    return plan_from_dict(data, f"plan {path}")


def write_plan(plan: Plan, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(plan.to_dict(), f, sort_keys=False)


def map_onto_allocation(plan: Plan, hosts: list[Host]) -> Plan:
    """A plan written against a hostfile (e.g. by `pdlaunch sbatch`) run inside a Slurm allocation,
    whose node names are known only there: the plan's hosts, in order of first use, become the
    allocation's nodes in order, so the placement (what shares a node) is kept exactly."""
    names = [h.name for h in hosts]
    used = list(dict.fromkeys(plan.rank_hosts()))
    if set(used) <= set(names):
        return plan
    if len(used) > len(names):
        raise UserError(f"plan uses {len(used)} hosts but the Slurm allocation has {len(names)} nodes "
                        f"({', '.join(names)}); allocate --nodes={len(used)}")
    rename = dict(zip(used, names))
    for inst in plan.instances:
        inst.hosts = [rename[h] for h in inst.hosts]
    plan.controller_host = rename[plan.controller_host]
    return plan


def assign_hosts(instances: list[InstancePlan], hosts: list[Host]) -> None:
    """Packs ranks onto hosts in order, instance after instance (high node-affinity placement)."""
    free = [(h.name, h.slots) for h in hosts]
    slots_total = sum(s for _, s in free)
    needed = sum(i.size for i in instances)
    if needed > slots_total:
        raise UserError(f"placement needs {needed} ranks but the hostfile has {slots_total} slots; "
                        "add slots/hosts or lower instances, tp or pp")
    cursor = 0
    for inst in instances:
        inst.hosts = []
        for _ in range(inst.size):
            while free[cursor][1] == 0:
                cursor += 1
            name, left = free[cursor]
            free[cursor] = (name, left - 1)
            inst.hosts.append(name)


def check_layouts(plan: Plan, shape: ModelShape, hosts: list[Host] | None = None, key: str = "placement") -> None:
    """Every instance's TP/PP must split the model evenly; hosts must exist and have the slots."""
    for inst in plan.instances:
        where = f"{key}.{inst.role}" if key == "placement" else f"{key} instance {inst.id}"
        if shape.num_kv_heads % inst.tp or shape.num_heads % inst.tp:
            raise UserError(f"config: '{where}.tp' = {inst.tp} does not divide the model's "
                            f"{shape.num_kv_heads} KV heads / {shape.num_heads} heads; pick a divisor "
                            f"of {shape.num_kv_heads}")
        if shape.vocab_size % inst.tp:
            raise UserError(f"config: '{where}.tp' = {inst.tp} does not divide the vocabulary "
                            f"({shape.vocab_size}); pick another TP degree")
        if shape.num_layers % inst.pp:
            raise UserError(f"config: '{where}.pp' = {inst.pp} does not divide the model's "
                            f"{shape.num_layers} layers; pick a divisor of {shape.num_layers}")
    if hosts is not None:
        slots = {h.name: h.slots for h in hosts}
        for inst in plan.instances:
            for h in inst.hosts:
                if h not in slots:
                    raise UserError(f"plan: host '{h}' of instance {inst.id} is not in the hostfile; "
                                    f"hosts there: {', '.join(slots)}")
        for h, n in plan.instance_ranks_by_host().items():
            if n > slots[h]:
                raise UserError(f"plan puts {n} ranks on '{h}' but the hostfile gives it {slots[h]} "
                                "slots; raise its slots or re-plan")


def packed_plan(groups: list[tuple[str, int, int, int]], hosts: list[Host]) -> Plan:
    """Instances of (role, count, tp, pp) groups, ranks in order after the controller, packed onto
    the hosts in order (high node-affinity placement)."""
    instances: list[InstancePlan] = []
    rank = CONTROLLER + 1
    for role, count, tp, pp in groups:
        for _ in range(count):
            instances.append(InstancePlan(len(instances), role, tp, pp, rank))
            rank += tp * pp
    assign_hosts(instances, hosts)
    return Plan(instances, hosts[0].name)


def plan_from_config(cfg: JobConfig, hosts: list[Host]) -> Plan:
    """The placement the config spells out: its phase layouts and instance counts, packed in order."""
    p = cfg.placement
    phases = [("colocated", p.colocated)] if p.mode == "colocated" else \
        [("prefill", p.prefill), ("decode", p.decode)]
    return packed_plan([(role, ph.instances, ph.tp, ph.pp) for role, ph in phases], hosts)
