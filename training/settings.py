"""The training job's settings: its flags and their defaults (training/train.py runs them).

A module of its own so that the job's driver (training/train.py) and its workers
(training/worker.py) both read them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_LR = {"sgd": 3e-3, "adam": 3e-4}  # the fastest stable rates on photos, digits, the sample
PATH = "path"  # the column Ray Data's read_parquet(include_paths=True) adds


# The defaults follow cs231n's linear-classifier practice (normalized pixels, tiny init, SGD with
# Nesterov momentum 0.9) plus a cosine decay, and were checked on real photographs, digits and the
# generated sample (benchmarks/train_defaults.py): lr 3e-3 is the fastest stable rate there,
# reg 0.1 costs no accuracy yet bounds ||W||, init std 1e-3 starts within 0.05 of ln(C).
@dataclass(frozen=True)
class Settings:
    data: str = field(metadata={"help": "ingest output to train on: local path or s3://"})
    output: str = field(metadata={"help": "where to write the model: local path or s3://"})
    epochs: int = field(default=10, metadata={"help": "passes over the training split"})
    batch_size: int = field(default=256, metadata={"help": "global batch, split across workers"})
    lr: float | None = field(default=None, metadata={
        "help": "peak learning rate, decayed by --schedule (default: 3e-3 sgd, 3e-4 adam)"})
    reg: float = field(default=0.1, metadata={"help": "L2 strength: loss += 0.5 * reg * ||W||^2"})
    robust_eps: float = field(default=0.0, metadata={
        "help": "L-inf radius in pixel levels (0..255): train on the certified upper bound of "
                "the worst-case cross-entropy within it (0: the plain cross-entropy)"})
    optimizer: str = field(default="sgd", metadata={
        "help": "sgd: Nesterov momentum; adam", "choices": ("sgd", "adam")})
    momentum: float = field(default=0.9, metadata={"help": "momentum of sgd"})
    schedule: str = field(default="cosine", metadata={
        "help": "learning rate over the run", "choices": ("cosine", "constant")})
    init_std: float = field(default=1e-3, metadata={
        "help": "std of the initial weights: small, so the first loss is near ln(C)"})
    seed: int = field(default=0, metadata={"help": "initial weights and shuffling"})
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers (DDP ranks)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker, NCCL"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs each worker reserves"})
    threads: int | None = field(default=None, metadata={
        "help": "torch threads per worker on CPU (default: its reserved CPUs, at least 1)"})
    cache: bool | None = field(default=None, metadata={
        "help": "hold each worker's shard in memory when it fits (default: on GPU only)"})
    shuffle: str = field(default="global", metadata={
        "help": "global: Ray Data shuffles the whole split (seeded) before each epoch, as "
                "ingest writes its files in class order; local: only each worker's buffer "
                "(reading overlaps training: for pre-shuffled data)",
        "choices": ("global", "local")})
    shuffle_buffer: int = field(default=4096, metadata={
        "help": "rows in each worker's shuffle buffer, reshuffled every epoch when streaming"})
    max_failures: int = field(default=3, metadata={
        "help": "worker failures to recover from, each from the latest checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing model"})

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]
