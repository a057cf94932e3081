"""Typed options of every command: one frozen dataclass per command, shared by the CLI, the recipe runner and
the API (see docs/architecture.md#options-and-results). Torch-free and stdlib only: the CLI imports it at
import time.

Convention (follow it for every options class in this file):
* ``@dataclass(frozen=True)``; field names are the CLI option names with ``-`` → ``_`` and the recipe
  parameter names; annotations and defaults are the CLI defaults (``None`` = "not given": the callee decides).
* Every field is ``field(default=..., metadata={...})`` with the keys
  - ``"help"``: the CLI help text (``None`` where the CLI option has none);
  - ``"cli"`` (optional): the flags when not just ``--name-with-dashes``, e.g. ``("-o", "--output")``;
    ``None`` marks an API-only field (no CLI option);
  - ``"recipe"`` (optional): ``False`` when the field is not a recipe step parameter;
  - ``"required"`` (optional): ``True`` for a required CLI option (its default ``None`` is then an error).
* Input/output paths that are CLI arguments (MODEL, ``-o``) are not options: they are the API call's
  positional parameters.
* ``validate()`` raises :class:`EdgecError` with the user-facing message; each check lives here only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from edgec.core.errors import EdgecError

# Shared help texts
_ARCH_HELP = ("Architecture: a zoo name, path/to/file.py:Class or package.module:Class (default: the project "
              "file's).")
_STRICT = "Exit 2 when any layer is skipped (CI)."
# Quality gates (edgec.app.gates): checked on the final artifact; a failed gate exits 1 and writes <output>.rejected
_MIN_METRIC = ("Gate: the artifact must score at least this on the data's test (else val) split, e.g. uar=0.85 "
               "(repeatable; accuracy, uar, macro_f1, ccc, map, map50, map75).")
_MAX_DROP = ("Gate: the metric (those of --min-metric, else uar / ccc / map) may fall at most this much (absolute) below "
             "the input model's, on the same data and split.")
_MAX_LATENCY = "Gate: the artifact's measured median onnxruntime latency (ms) must not exceed this."
_MAX_SIZE = "Gate: the artifact's file must not exceed this many KiB (1024 bytes)."
DISTILL_MODES = ("none", "logits", "off")  # the same tuple as edgec.train.loop.DISTILL_MODES

# Allowed values per field, for the CLI and recipes (edgec.app.params builds their schema from this): "choices",
# bounds "ge"/"gt"/"le"/"lt", or a "pattern" with the "text" errors show. Keyed by field name, since a name means
# the same thing in every command; "Class.field" overrides it for one command. Cross-field rules stay in validate().
SEED_MAX = 2**63 - 1  # torch seeds are 64-bit; records store them as int64
MIN_OPSET = 18  # the lowest opset torch's exporter writes (edgec.onnx.export checks the highest)
DEVICE = {"pattern": r"^(auto|cpu|mps|cuda(:[0-9]+)?)$", "text": "auto, cpu, mps, cuda or cuda:N"}
PATTERN = {"pattern": r"(?i)^\s*(channel|simd:([2-9]|[1-9][0-9]+))\s*$", "text": "channel or simd:N (N >= 2)"}
VALUE_RULES: dict[str, dict] = {
    "seed": {"ge": 0, "le": SEED_MAX}, "epochs": {"ge": 1}, "admm_epochs": {"ge": 0}, "finetune_epochs": {"ge": 0},
    "batch_size": {"ge": 1}, "batch": {"ge": 1}, "latency_batch": {"ge": 1}, "threads": {"ge": 1, "le": 1024},
    "lr": {"ge": 0}, "weight_decay": {"ge": 0}, "warmup": {"ge": 0, "lt": 1}, "grad_clip": {"ge": 0},
    "kd_weight": {"ge": 0, "le": 1}, "kd_temperature": {"gt": 0}, "off_weight": {"ge": 0},
    "n_mels": {"ge": 1}, "frames": {"ge": 1}, "val_fraction": {"ge": 0, "lt": 1}, "block_size": {"ge": 2},
    "latency_ms": {"gt": 0}, "latency_ratio": {"gt": 0, "le": 1}, "rho": {"ge": 0}, "max_retries": {"ge": 0},
    "margin": {"ge": 0, "lt": 1}, "min_density": {"gt": 0, "le": 1}, "expand": {"ge": 1}, "group_size": {"ge": 0},
    "opset": {"ge": MIN_OPSET}, "device": DEVICE, "pattern": PATTERN, "patterns": PATTERN,
    "init": {"choices": ("default", "preserve")}, "weights": {"choices": ("auto", "fp32", "int2")},
    "forms": {"choices": ("auto", "cast", "dq", "matmulnbits")},
    "activation_precision": {"choices": ("fp32", "int8")}, "split": {"choices": ("train", "val", "test")},
    "ScaffoldTernaryOptions.method": {"choices": ("sttn", "dlt")},
    "ScaffoldTernaryOptions.activations": {"choices": ("none", "ternary")},
    "ScaffoldBinaryOptions.activations": {"choices": ("none", "binary")},
    "max_new_tokens": {"ge": 1}, "temperature": {"ge": 0}, "top_k": {"ge": 1}, "top_p": {"gt": 0, "le": 1},
}


def value_rule(cls: type, name: str) -> dict:
    """The rule of ``cls``'s field ``name`` (empty when any value of its type goes)."""
    for klass in cls.__mro__:
        if f"{klass.__name__}.{name}" in VALUE_RULES:
            return VALUE_RULES[f"{klass.__name__}.{name}"]
    return VALUE_RULES.get(name, {})


def _opt(default, help: str | None, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class SourceOptions:
    """Where the model's code and example inputs come from; every command that reads a checkpoint takes these
    (first in its options). ``None`` = the project file's default (``[tool.edgec]``), else the checkpoint's."""

    arch: str | None = _opt(None, _ARCH_HELP)
    arch_config: str | dict | None = _opt(None, "Constructor arguments of --arch: JSON text or a .json file.")
    input_shape: list[str] | None = _opt(None, "Example input NAME=1x3x32x32[:dtype] (repeatable; a letter marks a "
                                               "dynamic axis, e.g. x=Bx3x32x32, idx=1xT=64:int64). Also the "
                                               "shape profile/prune measure at.")
    trust_pickle: bool = _opt(False, "Allow a checkpoint that is a whole pickled module (runs its code: only "
                                     "for files you trust).", recipe=False)
    no_verify: bool = _opt(False, "Load an edgec checkpoint whose digests are missing or do not match its weights "
                                  "and provenance (an old, damaged or edited file); the schema is still checked.")


@dataclass(frozen=True)
class DataOptions:
    """How a data source is loaded (``edgec.data.load_data``); ``None`` = the loader's / the model's default."""

    n_mels: int | None = _opt(None, "Log-mel bins for audio data (default: the model's).")
    frames: int | None = _opt(None, "Frames per clip for audio data (default 200).")
    val_fraction: float | None = _opt(None, "Held-out fraction when the data has no val split.")
    block_size: int | None = _opt(None, "Tokens per causal-LM training block for text data (default 128, at most "
                                        "the model's longest sequence).")

    def to_kwargs(self) -> dict:
        """The keyword arguments for ``load_data`` (only those given, in field order)."""
        return {k: v for k, v in (("n_mels", self.n_mels), ("frames", self.frames),
                                  ("val_fraction", self.val_fraction), ("block_size", self.block_size))
                if v is not None}


@dataclass(frozen=True)
class FinetuneOptions(SourceOptions):
    """``edgec finetune MODEL --data D -o OUT``: the training run's options."""

    data: str = _opt(None, "Audio folder with labels.csv (or an audio .csv: a label or a numeric value column), "
                           "tensor file or package.module:function.", required=True)
    epochs: int = _opt(10, "Epochs.")
    batch_size: int = _opt(32, "Global batch size (split across processes).")
    lr: float = _opt(1e-3, "Peak learning rate (AdamW).")
    weight_decay: float = _opt(0.01, None)
    warmup: float = _opt(0.1, "Warm-up as a fraction of all steps, then cosine decay.")
    grad_clip: float | None = _opt(1.0, "Max gradient norm (0: off).")
    seed: int = _opt(0, "Seed for data order, dropout and initialisation.")
    distill: str | None = _opt(None, "none | logits (KL on soft targets) | off (task loss + λ·(1 − cos) on hidden "
                                     "features). Default: logits with --teacher, else none.")
    teacher: str | None = _opt(None, "Teacher checkpoint (default with --distill: the full-precision checkpoint "
                                     "the scaffold came from, found by digest next to MODEL).")
    kd_weight: float | None = _opt(None, "w in (1−w)·task + w·KD; default 0.5 with logits, 0 with off; "
                                         "1 = pure distillation.")
    off_weight: float = _opt(1.0, "λ: weight of the OFF term.")
    # CLI: one comma-separated string, split into the list; API/recipe: a list of names/globs
    off_layers: list[str] | None = _opt(None, "Comma-separated module names/globs whose outputs OFF compares "
                                              "(default: every block output).")
    binary_weights: str | list[float] | None = _opt(None, "λ1,λ2 for binary scaffolds' latent path (default: as "
                                                          "recorded by scaffold binary; 0,0 = off).")
    kd_temperature: float = _opt(2.0, None)
    resume: bool = _opt(False, "Continue from the resume file of an interrupted run.")
    resume_file: str | None = _opt(None, "Default: <output>.resume.")
    keep_resume: bool = _opt(False, "Keep the resume file after success.")
    device: str | None = _opt(None, "auto (default), cpu, cuda, cuda:N.")
    fsdp: bool = _opt(False, "Under torchrun: shard parameters, gradients and optimizer states across the "
                            "processes (torch FSDP) instead of replicating them (DDP).")
    n_mels: int | None = _opt(None, "Log-mel bins for audio data (default: the model's).")
    frames: int | None = _opt(None, "Frames per clip for audio data (default 200).")
    val_fraction: float | None = _opt(None, "Held-out fraction when the data has no val split.")
    block_size: int | None = _opt(None, "Tokens per causal-LM training block for text data (default 128, at most "
                                        "the model's longest sequence).")

    @property
    def data_options(self) -> DataOptions:
        return DataOptions(n_mels=self.n_mels, frames=self.frames, val_fraction=self.val_fraction,
                           block_size=self.block_size)

    def distill_mode(self) -> str:
        """``distill`` resolved: None/"auto" → "logits" with a teacher, else "none"."""
        if self.distill in (None, "auto"):
            return "logits" if self.teacher is not None else "none"
        return str(self.distill).lower()

    def validate(self) -> None:
        if self.distill_mode() not in DISTILL_MODES:
            raise EdgecError(f"--distill must be one of {', '.join(DISTILL_MODES)} (got {self.distill!r})")


@dataclass(frozen=True)
class PruneOptions(SourceOptions):
    """``edgec prune MODEL -o OUT``: ALCS under a measured latency budget (exactly one of the two budgets)."""

    strict: bool = _opt(False, _STRICT)

    latency_ms: float | None = _opt(None, "Budget: median ORT latency in ms.")
    latency_ratio: float | None = _opt(None, "Budget as a fraction of the dense model's measured latency (e.g. 0.6).")
    data: str | None = _opt(None, "Training data: ADMM + fine-tune (without: one-shot importance pruning, lower "
                                  "quality).")
    table: str | None = _opt(None, "Latency table measured on the target device.")
    pattern: str = _opt("channel", "channel | simd:N (ALCS 1×N vectors; used only where the table measures it "
                                   "faster).")
    threads: int = _opt(1, "onnxruntime threads for the budget.")
    batch: int = _opt(1, "Batch size the budget applies to.")
    admm_epochs: int = _opt(3, "ADMM rounds (with --data).")
    finetune_epochs: int = _opt(3, "Fine-tune epochs after the hard mask.")
    rho: float = _opt(1e-3, "ADMM penalty ρ.")
    lr: float = _opt(1e-3, "Learning rate for ADMM and fine-tuning.")
    min_density: float | None = _opt(None, "Keep at least this fraction of every group.")
    importance: str = _opt("auto", "Unit importance the allocation trades against latency: auto (taylor with "
                                   "--data, else l2) | taylor (loss sensitivity on held-out batches) | l2 (weight "
                                   "norm).")
    align: int = _opt(8, "Kept channel counts are multiples of this in groups of at least 4x as many units (1: any "
                         "count).")
    search: bool = _opt(True, "Before training, measure pruned structures to find the loosest allocation that "
                              "meets the budget (the table's estimate can be far off); cached per machine like the "
                              "latency table. --no-search: the table alone sets the target.",
                      cli=("--search/--no-search",))
    max_retries: int = _opt(3, "Retries when the measured latency misses (retry k aims 0.95^(k(k+1)/2) lower: 5, 14, 26, 40 %…).")
    margin: float = _opt(0.0, "Aim the allocation this fraction below the budget (room for measurement noise "
                              "and latency-model error; e.g. 0.05).")
    seed: int = _opt(0, "Seed.")
    min_metric: list[str] | dict | None = _opt(None, _MIN_METRIC)
    max_metric_drop: float | None = _opt(None, _MAX_DROP)
    max_latency_ms: float | None = _opt(None, _MAX_LATENCY)
    max_size_kb: float | None = _opt(None, _MAX_SIZE)
    n_mels: int | None = _opt(None, None)
    frames: int | None = _opt(None, None)
    # API-only (no CLI option, not recipe parameters)
    val_fraction: float | None = _opt(None, None, cli=None, recipe=False)
    batch_size: int = _opt(32, "Batch size of ADMM and fine-tuning.", cli=None, recipe=False)
    densities: list[float] | None = _opt(None, "Profiling grid when a table is measured (default: "
                                               "edgec.latency.profiling.DEFAULT_DENSITIES).", cli=None, recipe=False)
    profile_options: dict | None = _opt(None, "Passed to the profiler.", cli=None, recipe=False)
    measure_options: dict | None = _opt(None, "Passed to the measurement protocol.", cli=None, recipe=False)

    @property
    def data_options(self) -> DataOptions:
        return DataOptions(n_mels=self.n_mels, frames=self.frames, val_fraction=self.val_fraction)

    def validate(self) -> None:
        problems = []
        if (self.latency_ms is None) == (self.latency_ratio is None):
            problems.append("give exactly one of --latency-ms and --latency-ratio")
        ms, ratio = self.latency_ms, self.latency_ratio
        if ms is not None and not (isinstance(ms, (int, float)) and math.isfinite(ms) and ms > 0):
            problems.append(f"--latency-ms must be a number > 0 (got {ms!r})")
        if ratio is not None and not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
            problems.append(f"--latency-ratio must be in (0, 1] (got {ratio!r})")
        if int(self.threads) < 1:
            problems.append(f"threads must be >= 1 (got {self.threads})")
        if int(self.batch) < 1:
            problems.append(f"batch must be >= 1 (got {self.batch})")
        if int(self.admm_epochs) < 0 or int(self.finetune_epochs) < 0:
            problems.append("epochs must be >= 0")
        if not (float(self.rho) >= 0 and math.isfinite(self.rho)):
            problems.append(f"rho must be a finite number >= 0 (got {self.rho})")
        if not (float(self.lr) > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a finite number > 0 (got {self.lr})")
        if int(self.max_retries) < 0:
            problems.append(f"max_retries must be >= 0 (got {self.max_retries})")
        if not 0.0 <= float(self.margin) < 1.0:
            problems.append(f"margin is a fraction of the budget in [0, 1) (got {self.margin})")
        if self.min_density is not None and not 0.0 < float(self.min_density) <= 1.0:
            problems.append(f"min_density must be in (0, 1] (got {self.min_density})")
        if self.importance not in ("auto", "taylor", "l2"):
            problems.append(f"importance must be auto, taylor or l2 (got {self.importance!r})")
        elif self.importance == "taylor" and self.data is None:
            problems.append("--importance taylor needs --data (held-out batches to take gradients on)")
        if not isinstance(self.align, int) or isinstance(self.align, bool) or self.align < 1:
            problems.append(f"align must be an integer >= 1 (got {self.align!r})")
        if problems:
            raise EdgecError("; ".join(problems))


# --- the other commands (zoo, scaffold, fold, export, eval, profile, inspect) -------------------------

_INCLUDE_HELP = "Glob over layer names (repeatable)."
_EXCLUDE_HELP = "Glob over layer names to skip (repeatable)."


def _keep_first_last():
    return _opt(True, "Keep the first layer (when it reads the model input; after an embedding every Linear is "
                      "quantized) and the head of each model output (classifier, LM head; a detector's class "
                      "and box heads) in full precision.",
                cli=("--keep-first-last/--no-keep-first-last",))


@dataclass(frozen=True)
class ZooCreateOptions:
    """``edgec zoo create NAME -o OUT``: config overrides and the initialisation seed."""

    # CLI: repeatable key=value strings, parsed into this table
    set: dict | None = _opt(None, "Config override key=value (repeatable).")
    seed: int = _opt(0, "Initialisation seed.")


@dataclass(frozen=True)
class ScaffoldHrfOptions(SourceOptions):
    """``edgec scaffold hrf MODEL``: the scaffold.hrf pass's parameters."""

    strict: bool = _opt(False, _STRICT)

    expand: int = _opt(4, "K: H maps d → K·d.")
    include: list[str] | None = _opt(None, "Glob over FFN first-linear names (repeatable).")
    exclude: list[str] | None = _opt(None, "Glob to skip (repeatable).")
    init: str = _opt("default", "default (train from scratch) | preserve (function-preserving).")
    seed: int = _opt(0, "Seed for the inserted weights.")


@dataclass(frozen=True)
class ScaffoldTernaryOptions(SourceOptions):
    """``edgec scaffold ternary MODEL``: STTN or DLT and their pass parameters."""

    strict: bool = _opt(False, _STRICT)

    method: str = _opt("sttn", "sttn (two binary kernels, soft threshold) | dlt (learnable per-group scale and "
                               "shift).")
    group_size: int | None = _opt(None, "DLT group size along the fan-in (0: one group per output channel; "
                                        "default 128).")
    activations: str = _opt("none", "none | ternary (quantize layer inputs).")
    include: list[str] | None = _opt(None, _INCLUDE_HELP)
    exclude: list[str] | None = _opt(None, _EXCLUDE_HELP)
    keep_first_last: bool = _keep_first_last()
    seed: int | None = _opt(None, "Seed for STTN's latent split.")

    def validate(self) -> None:
        if self.method not in ("sttn", "dlt"):
            raise EdgecError(f"--method must be sttn or dlt, got '{self.method}'")
        if self.method == "sttn" and self.group_size is not None:
            raise EdgecError("--group-size applies to --method dlt (STTN scales per output channel)")


@dataclass(frozen=True)
class ScaffoldBinaryOptions(SourceOptions):
    """``edgec scaffold binary MODEL``: the scaffold.binary pass's parameters."""

    strict: bool = _opt(False, _STRICT)

    activations: str = _opt("none", "none | binary (quantize layer inputs).")
    latent_weight: str | list[float] = _opt("0.5,0.5", "λ1,λ2: weights of the real-valued latent path's CE and "
                                                       "cosine terms during fine-tuning.")
    include: list[str] | None = _opt(None, _INCLUDE_HELP)
    exclude: list[str] | None = _opt(None, _EXCLUDE_HELP)
    keep_first_last: bool = _keep_first_last()


@dataclass(frozen=True)
class FoldOptions(SourceOptions):
    """``edgec fold MODEL``."""

    strict: bool = _opt(False, _STRICT)



@dataclass(frozen=True)
class ExportOptions(SourceOptions):
    """``edgec export MODEL``: opset and how low-bit weights are stored."""

    opset: int | None = _opt(None, "ONNX opset (default 20; 25 with INT2 weights).")
    weights: str = _opt("auto", "auto (INT2 where the graph is ternary/binary) | fp32 | int2.")
    forms: str = _opt("auto", "INT2 layer form: auto (fastest per layer in the target session, never slower "
                              "than fp32) | cast (Cast->Mul: fp32 speed) | dq (DequantizeLinear) | matmulnbits.")
    activation_precision: str = _opt("fp32", "fp32 (exact) | int8 (MatMulNBits accuracy_level 4: faster, "
                                             "approximate; with --data both precisions are scored).")
    target_config: str | None = _opt(None, "onnxruntime session the forms are chosen and verified for: default | "
                                           "disable_quant_qdq | key=value[,key=value].")
    data: str | None = _opt(None, "Data the metric gates score the exported file on (its test, else val split; "
                                  "also fills the model card's metrics and class labels).")
    threads: int = _opt(1, "onnxruntime threads for the latency gate and for timing INT2 forms.")
    kv_cache: bool = _opt(False, "One prefill + decode graph with past/present key-value inputs and outputs "
                                 "(onnxruntime-genai / Optimum layout) for `edgec generate`; needs a model with "
                                 "forward_cached (zoo llama).")
    min_metric: list[str] | dict | None = _opt(None, _MIN_METRIC)
    max_metric_drop: float | None = _opt(None, _MAX_DROP)
    max_latency_ms: float | None = _opt(None, _MAX_LATENCY)
    max_size_kb: float | None = _opt(None, _MAX_SIZE)


@dataclass(frozen=True)
class EvalOptions(SourceOptions):
    """``edgec eval MODEL --data D``: the evaluation protocol's options."""

    data: str = _opt(None, "Audio folder with labels.csv (or an audio .csv with a value column: regression), "
                           "tensor file (.pt/.npz/.safetensors) or package.module:function.", required=True)
    split: str = _opt("test", "Split to score (test falls back to val when absent).")
    threads: int = _opt(1, "onnxruntime intra-op threads for latency.")
    latency_batch: int = _opt(1, "Batch size for the latency run.")
    no_latency: bool = _opt(False, "Skip the latency measurement.")
    n_mels: int | None = _opt(None, "Log-mel bins (default: the model's).")
    frames: int | None = _opt(None, "Frames per clip (default: as fine-tuned, else 200).")
    block_size: int | None = _opt(None, "Tokens per block for text data (default: as fine-tuned, else 128, at "
                                        "most the model's longest sequence).")


@dataclass(frozen=True)
class ProfileOptions(SourceOptions):
    """``edgec profile MODEL``: what to time, and where a table comes from."""

    threads: int = _opt(1, "onnxruntime intra-op threads (part of the table key).")
    batch: int = _opt(1, "Batch size when --input-shape is not given.")
    patterns: list[str] | None = _opt(None, "channel and/or simd:N (repeatable).", cli=("--pattern",))
    table: str | None = _opt(None, "Use a table measured on the target device.")
    plot: str | None = _opt(None, "Write per-unit latency bars to this PNG.")
    refresh: bool = _opt(False, "Measure again even if a cached table matches.")
    units: str = _opt("groups", None, cli=None, recipe=False)


@dataclass(frozen=True)
class InspectOptions(SourceOptions):
    """``edgec inspect FILE``."""

    layers: bool = _opt(False, "List every weight layer with its bit width.", recipe=False)


@dataclass(frozen=True)
class GenerateOptions(SourceOptions):
    """``edgec generate MODEL``: the prompt, the stopping rule and the token selection (edgec.generation)."""

    prompt: str | None = _opt(None, "Prompt text (needs --tokenizer).")
    prompt_ids: str | None = _opt(None, "Prompt as comma-separated token ids, e.g. 1,2,3 (a model without a "
                                        "tokenizer).")
    tokenizer: str | None = _opt(None, "tokenizer.json (Hugging Face tokenizers) for --prompt and the output text.")
    max_new_tokens: int = _opt(32, "Most tokens to generate (fewer at the end-of-text token or the context).")
    temperature: float | None = _opt(None, "Sample at this temperature (default: greedy; 0 = greedy).")
    top_k: int | None = _opt(None, "Sample among the k most likely tokens only.")
    top_p: float | None = _opt(None, "Sample among the most likely tokens whose probability reaches p (nucleus).")
    seed: int = _opt(0, "Seed of the sampling (the same seed gives the same tokens).")
    threads: int = _opt(1, "Threads (onnxruntime intra-op, or torch).")

    def validate(self) -> None:
        if (self.prompt is None) == (self.prompt_ids is None):
            raise EdgecError("give exactly one of --prompt TEXT (with --tokenizer) and --prompt-ids 1,2,3")
        if self.prompt is not None and self.tokenizer is None:
            raise EdgecError("--prompt needs --tokenizer tokenizer.json (or give --prompt-ids 1,2,3)")
        if not self.temperature and (self.top_k is not None or self.top_p is not None):
            raise EdgecError("--top-k / --top-p apply to sampling: give --temperature > 0 as well")
