"""The cluster a plan is for: how many devices, how they are grouped into nodes, and what
each can do. Given by flags or a YAML file for a cluster that is not this one (planning for
2,048 GPUs needs neither a GPU nor torch), or measured here (measure.py).

Bandwidths are bus bandwidths in GB/s (gigabytes), as `sdtrain bench comm` and nccl-tests
report them: an all-reduce of S bytes over n ranks takes S x 2(n-1)/n / busbw, an all-gather
or reduce-scatter S x (n-1)/n / busbw. inter_node_gbps is what one device gets across nodes
(a node's network divided by its devices).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from sdtrain.errors import UserInputError, excerpt, printable

GiB = 2**30

# What a flag or YAML key left out stands for on a GPU cluster (an A100/H100-class node);
# each is printed with the plan, so the assumption is never hidden.
GPU_DEFAULTS = {
    "memory_gbps": 1600.0,  # device memory bandwidth (the optimizer step is bound by it)
    "host_memory_gbps": 50.0,  # host memory, where an offloaded optimizer steps
    "pcie_gbps": 20.0,  # device <-> host, each way
    "disk_gbps": 3.0,  # NVMe, where offloaded optimizer state lives
    "efficiency": 0.65,  # share of peak a block's matmuls reach at large micro-batches
    "efficiency_half_tokens": 256.0,  # tokens per micro-batch at which half of that is reached
    "latency_us": 20.0,  # what any collective costs however small (NCCL in a node)
}


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpus_per_node: int
    device_memory_gib: float  # what one rank may hold
    peak_tflops: float  # per device, the precision the recipe trains in
    intra_node_gbps: float
    inter_node_gbps: float
    memory_gbps: float = GPU_DEFAULTS["memory_gbps"]
    host_memory_gbps: float = GPU_DEFAULTS["host_memory_gbps"]
    pcie_gbps: float = GPU_DEFAULTS["pcie_gbps"]
    disk_gbps: float = GPU_DEFAULTS["disk_gbps"]
    efficiency: float = GPU_DEFAULTS["efficiency"]
    efficiency_half_tokens: float = GPU_DEFAULTS["efficiency_half_tokens"]
    latency_us: float = GPU_DEFAULTS["latency_us"]
    # the share of its device a rank has while every rank of its node computes: 1 for GPUs; on
    # CPU, cores / (ranks x threads each) where more ranks than cores share them
    rank_share: float = 1.0
    # measured (tp_probe.py): (tp, how much more than FLOPs / tp a tp layout's compute and its
    # collectives took); none given: FLOPs / tp and the collectives priced from bandwidth
    tp_overheads: tuple = ()
    device: str = "cuda"  # cuda | cpu: which memory the estimate counts (cpu: the whole process)
    source: str = "given"  # where these numbers come from, for the header and the cache

    def __post_init__(self):
        for field in fields(self):
            value = getattr(self, field.name)
            if field.type in ("int", "float") and not value > 0:
                raise UserInputError(f"cluster {field.name} {value!r}: must be above 0 (--{flag(field.name)} or "
                                     f"{field.name}: in the cluster YAML)")
        if self.gpus % self.gpus_per_node and self.gpus > self.gpus_per_node:
            raise UserInputError(f"--gpus {self.gpus} is not a multiple of --gpus-per-node {self.gpus_per_node}: "
                                 "give whole nodes")
        if not self.rank_share <= 1:
            raise UserInputError(f"cluster rank_share {self.rank_share}: a share of a device, at most 1")
        if not self.efficiency <= 1:
            raise UserInputError(f"cluster efficiency {self.efficiency}: a share of peak, at most 1")

    @property
    def overlaps(self) -> bool:
        """Whether communication runs beside compute: on a GPU it has its own engines and streams;
        CPU ranks run gloo's transfers on the cores the matmuls need, so nothing hides."""
        return self.device == "cuda"

    @property
    def latency(self) -> float:
        return self.latency_us * 1e-6

    @property
    def nodes(self) -> int:
        return max(1, self.gpus // self.gpus_per_node)

    @property
    def per_node(self) -> int:
        return min(self.gpus, self.gpus_per_node)

    @property
    def budget_bytes(self) -> float:
        return self.device_memory_gib * GiB

    def bandwidth(self, group_span: int) -> float:
        """Bus bandwidth (bytes/s) of a group whose members lie `group_span` consecutive ranks apart
        at most: inside a node, or across nodes (the slower link sets a ring's pace)."""
        gbps = self.intra_node_gbps if group_span <= self.per_node else self.inter_node_gbps
        return gbps * 1e9

    def tp_overhead(self, tp: int) -> float | None:
        return next((overhead for size, overhead in self.tp_overheads if size == tp), None)

    def efficiency_at(self, tokens: float) -> float:
        """Share of peak a micro-batch of `tokens` tokens per rank reaches: small matmuls waste
        the device, large ones saturate at `efficiency`."""
        return self.efficiency * tokens / (tokens + self.efficiency_half_tokens)

    def describe(self) -> str:
        return (f"{self.gpus} {'GPU' if self.device == 'cuda' else 'CPU rank'}(s), {self.per_node} per node, "
                f"{self.device_memory_gib:g} GiB each, {self.peak_tflops:g} TFLOP/s peak x efficiency "
                f"{self.efficiency:.2f}, bus bandwidth {self.intra_node_gbps:g} GB/s in a node, "
                f"{self.inter_node_gbps:g} GB/s across"
                + (f", ranks sharing cores ({self.rank_share:g} of one each)" if self.rank_share < 1 else "")
                + f" ({self.source})")

    def as_dict(self) -> dict:
        return asdict(self)


def flag(name: str) -> str:
    return name.replace("_", "-")


GIVEN_FLAGS = ("gpus", "gpus_per_node", "device_memory_gib", "peak_tflops", "intra_node_gbps", "inter_node_gbps")


def cluster_from_flags(values: dict) -> Cluster | None:
    """The cluster the six flags describe; None where none is given (measure here); every one
    is needed once any is."""
    given = {k: values.get(k) for k in GIVEN_FLAGS if values.get(k) is not None}
    if not given:
        return None
    missing = [k for k in GIVEN_FLAGS if k not in given]
    if missing:
        raise UserInputError(f"a cluster given by flags needs all six; missing {', '.join('--' + flag(m) for m in missing)} "
                             "(or give --cluster cluster.yaml, or none of them to measure this machine)")
    return Cluster(**given, source="given by flags")


def cluster_from_yaml(path: str) -> Cluster:
    """A cluster YAML: the six flags' names as keys (gpus: 1024 ...) and optionally memory_gbps,
    host_memory_gbps, pcie_gbps, disk_gbps, efficiency, efficiency_half_tokens, latency_us, rank_share,
    device."""
    from sdtrain.user_files import BoundedLoader, parse_yaml, read_text

    text = read_text(path, "cluster file", 1 << 16, "YAML", UserInputError)
    raw = parse_yaml(text, f"cluster file {printable(path)}", BoundedLoader, 1000, UserInputError) or {}
    if not isinstance(raw, dict):
        raise UserInputError(f"cluster file {printable(path)} must be a mapping of keys (gpus: 1024 ...)")
    known = {f.name: f for f in fields(Cluster) if f.name not in ("source", "tp_overheads")}
    unknown = [k for k in raw if k not in known]
    if unknown:
        raise UserInputError(f"cluster file {printable(path)}: unknown key {excerpt(unknown[0])}; known: {', '.join(known)}")
    missing = [k for k in GIVEN_FLAGS if k not in raw]
    if missing:
        raise UserInputError(f"cluster file {printable(path)} needs {', '.join(missing)}")
    values = {}
    for key, value in raw.items():
        kind = known[key].type
        try:
            values[key] = int(value) if kind == "int" else float(value) if kind == "float" else str(value)
        except (TypeError, ValueError):
            raise UserInputError(f"cluster file {printable(path)}: {key} {excerpt(value)} is not a number") from None
    if values.get("device", "cuda") not in ("cuda", "cpu"):
        raise UserInputError(f"cluster file {printable(path)}: device is cuda or cpu")
    return Cluster(**values, source=f"cluster file {printable(path)}")
