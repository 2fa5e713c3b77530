"""The build recipe: one pydantic object, the single source of defaults.

A recipe is validated in full before any work starts and saved, resolved, into
the manifest next to what it produced.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError

DEFAULT_TEACHER = "smollm2-135m-instruct"


class Section(BaseModel):
    # allow_inf_nan=False: a bound like lr > 0 lets inf through, and nan fails every comparison silently
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TeacherSpec(Section):
    model: str = Field(DEFAULT_TEACHER, description="'smollm2-135m-instruct' (embedded), a HF model dir, a hub id, or a .gguf file")


class StudentSpec(Section):
    init: Literal["depth_prune", "model"] = Field("depth_prune", description="how the student is made")
    model: str | None = Field(None, description="student model path/id when init == 'model'")
    keep_ratio: float = Field(0.5, gt=0.0, le=0.5, description="fraction of teacher layers kept by depth pruning (≤ 0.5)")
    calib_windows: int = Field(8, ge=1, le=1024, description="calibration windows used to score layer importance")
    width_ratio: float = Field(1.0, gt=0.0, le=1.0, description="depth_prune then keep this share of FFN neurons and KV groups (1: no width pruning)")

    @model_validator(mode="after")
    def _model_needed(self) -> "StudentSpec":
        if self.init == "model" and not self.model:
            raise ValueError("student.init is 'model' but student.model is empty; give a model path or id")
        return self


class DataSpec(Section):
    source: str = Field("stdlib", description="'stdlib' (Python standard library docstrings and sources) or a text file / folder of .txt/.md/.rst/.py")
    max_chars: int = Field(3_000_000, ge=10_000, description="cap on characters read")
    heldout_fraction: float = Field(0.05, gt=0.0, lt=0.5, description="share of the text kept out of training, for evaluation")
    seed: int = 0


def compile_switch_problem(compile: bool, cuda_graphs: bool, memory_budget: float | None) -> str | None:
    """What is wrong with distill.cuda_graphs / memory_budget given distill.compile, or None: the one rule the recipe
    and the engine's KDConfig both apply."""
    for name, value in (("cuda_graphs", cuda_graphs), ("memory_budget", memory_budget)):
        if value not in (None, False) and not compile:
            return f"distill.{name} acts on the compiled blocks: set distill.compile: true as well."
    if memory_budget is not None and not 0.0 < memory_budget < 1.0:
        return f"distill.memory_budget {memory_budget}: expected a fraction in (0, 1)."
    return None


class DistillSpec(Section):
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field("forward_kl", description="KL(teacher‖student), KL(student‖teacher) or generalized JSD")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="JSD mixture weight: 0 → forward KL, 1 → reverse KL")
    ce_weight: float = Field(0.0, ge=0.0, le=1.0, description="share of hard-label cross-entropy mixed into the loss")
    steps: int = Field(200, ge=1, le=1_000_000)
    batch_size: int = Field(4, ge=1, le=4096)
    grad_accum: int = Field(1, ge=1, le=1024, description="micro-batches per optimizer step")
    seq_len: int = Field(128, ge=8, le=32768)
    lr: float = Field(1e-3, gt=0.0, lt=1.0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0.0, lt=1.0)
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    grad_clip: float = Field(1.0, gt=0.0)
    seed: int = 0
    chunk_tokens: int = Field(1024, ge=16, le=65536, description="tokens per loss chunk (memory ∝ chunk × vocab)")
    teacher_mode: Literal["online", "offline"] = Field("online", description="offline: cache the teacher's top-k log-probs once")
    teacher_quant: Literal["none", "nf4"] = Field("none", description="nf4: load the teacher in 4 bits through bitsandbytes (CUDA GPUs only)")
    top_k: int = Field(32, ge=1, le=4096, description="offline teacher: log-probs kept per token (4 + 4·k bytes/token)")
    chat_data: str | None = Field(None, description="JSONL of {'messages': [...]}: train on assistant tokens instead of data.source")
    prompts: str | None = Field(None, description="JSONL of {'prompt'} or {'messages'} for on-policy / sequence-level KD")
    on_policy_fraction: float = Field(0.0, ge=0.0, le=1.0, description="GKD λ: share of batches the student generates")
    sequence_kd_fraction: float = Field(0.0, ge=0.0, le=1.0, description="share of batches the teacher generates")
    max_new_tokens: int = Field(64, ge=1, le=8192)
    quantize_aware: Literal["q8_0", "q4_0", "q4_1"] | None = Field(None, description="train through this GGUF grid (QAT)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast where the device computes bf16 natively (GPU; AMX or AVX512-BF16 CPU), else fp32")
    compile: bool = Field(False, description="torch.compile each block (student and teacher) and the loss's chunk arithmetic")
    gradient_checkpointing: bool | int = Field(False, description="recompute block activations in backward: true for "
                                               "every student block, a number N for the first N (less memory, "
                                               "N/all of the recompute)")
    cuda_graphs: bool = Field(False, description="with compile, on a CUDA GPU: replay the compiled blocks as CUDA graphs "
                                                 "(kernel launches stop bounding the step); ignored on CPU")
    memory_budget: float | None = Field(None, gt=0.0, lt=1.0, description="with compile: keep about this fraction of "
                                        "the activations the compiled blocks would save, recomputing the cheapest ones")

    @field_validator("gradient_checkpointing")
    @classmethod
    def _ckpt_blocks(cls, v):
        if not isinstance(v, bool) and v < 0:
            raise ValueError("expected true, false or a number of blocks ≥ 0")
        return v
    eval_every: int = Field(0, ge=0, description="held-out perplexity and KL every N steps (0: off)")
    checkpoint_every: int = Field(0, ge=0, description="save a resumable checkpoint every N steps (0: off)")

    @model_validator(mode="after")
    def _fractions(self) -> "DistillSpec":
        if self.on_policy_fraction + self.sequence_kd_fraction > 1.0:
            raise ValueError("distill.on_policy_fraction + sequence_kd_fraction must be at most 1")
        problem = compile_switch_problem(self.compile, self.cuda_graphs, self.memory_budget)
        if problem:
            raise ValueError(problem)
        return self


class CompressSpec(Section):
    method: Literal["q8_0", "none", "gptq", "sparsegpt", "structured", "qat"] = Field(
        "q8_0", description="q8_0: round-to-nearest on GGUF's Q8_0 grid (blocks of 32, fp16 scale); qat: pass the "
        "codes of a quantize-aware student (distill.quantize_aware's grid) through unchanged; gptq: OBS rounding "
        "onto `grid`; sparsegpt: OBS pruning by `sparsity`/`pattern` (plus `grid` for joint quantization); "
        "structured: remove FFN neurons / KV head groups with OBS compensation (a smaller dense model)")
    grid: Literal["q8_0", "q4_0", "q4_1"] | None = Field(None, description="GGUF grid for gptq (default q4_0) or sparsegpt+quantization")
    sparsity: float = Field(0.5, gt=0.0, lt=1.0, description="sparsegpt (unstructured): fraction of each block linear removed; structured: fraction of FFN neurons removed")
    pattern: str = Field("unstructured", pattern=r"^(unstructured|\d+:\d+)$", description="sparsegpt: 'unstructured' or N:M ('2:4', '4:8')")
    heads_sparsity: float = Field(0.0, ge=0.0, lt=1.0, description="structured: fraction of KV head groups removed")
    sparsity_profile: Literal["uniform", "owl"] = Field(
        "uniform", description="sparsegpt (unstructured): the same sparsity in every block, or OWL's outlier-weighted "
        "per-block sparsity (mean = `sparsity`, blocks with more activation outliers pruned less)")
    owl_threshold: float = Field(5.0, gt=0.0, description="owl: a weight is an outlier when |W|·‖X‖ > this × its block's mean")
    owl_lambda: float = Field(0.08, ge=0.0, lt=0.5, description="owl: block sparsities lie within sparsity ± this")
    act_order: bool = Field(True, description="gptq: quantize columns by decreasing Hessian diagonal (static 32-column groups)")
    damp: float = Field(0.01, gt=0.0, lt=1.0, description="relative Hessian dampening (escalated automatically on failure)")
    blocksize: int = Field(128, ge=32, le=4096, multiple_of=32, description="OBS sweep outer block (columns)")
    calib_windows: int = Field(32, ge=1, le=4096, description="calibration windows (from the training text)")
    calib_seq_len: int = Field(512, ge=8, le=32768)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="where each block is compressed: auto = GPU if present")
    one_pass: bool | None = Field(None, description="sparsegpt/gptq: one block forward, each linear group compressed as "
                                  "the forward reaches it (true sequential); default: on CPU, off on GPU")
    eval_windows: int = Field(8, ge=1, le=10_000, description="held-out windows for perplexity before/after")

    @model_validator(mode="after")
    def _grid_fits_method(self) -> "CompressSpec":
        if self.method == "gptq" and self.grid is None:
            self.grid = "q4_0"
        if self.method == "sparsegpt" and self.grid == "q4_1":
            raise ValueError("sparsegpt with a grid needs one that stores an exact zero (q8_0 or q4_0), not q4_1")
        if self.sparsity_profile == "owl":
            if self.method != "sparsegpt" or self.pattern != "unstructured":
                raise ValueError("sparsity_profile 'owl' needs method 'sparsegpt' with pattern 'unstructured' "
                                 f"(got method '{self.method}', pattern '{self.pattern}')")
            if self.owl_lambda >= min(self.sparsity, 1 - self.sparsity):
                raise ValueError(f"owl_lambda {self.owl_lambda} must be below min(sparsity, 1 − sparsity) = "
                                 f"{min(self.sparsity, 1 - self.sparsity):.3g} so every block's sparsity stays in (0, 1)")
        return self


GgufType = Literal["f32", "f16", "q8_0", "q4_0", "q4_1", "q4_k_m", "q5_k_m", "q6_k"]
OnnxQuant = Literal["int8", "int4"]


class ExportSpec(Section):
    gguf: list[GgufType] = Field(default_factory=lambda: ["f16", "q8_0"],
                                 description="k-quants (q4_k_m, q5_k_m, q6_k) are made by llama.cpp's quantizer")
    onnx: bool = True
    onnx_graph: Literal["kv_cache", "logits"] = Field("kv_cache", description="kv_cache: incremental decoding")
    onnx_quant: list[OnnxQuant] = Field(default_factory=list, description="also write student-int8.onnx / -int4.onnx")

    @field_validator("gguf")
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate GGUF types in {v}")
        return v


class EvalSpec(Section):
    windows: int = Field(24, ge=1, le=100_000, description="held-out windows for perplexity")
    seq_len: int = Field(256, ge=8, le=32768)
    decode_tokens: int = Field(32, ge=0, le=4096, description="tokens decoded per exported file to time it (0: skip)")
    # Gates on every exported file, against the torch student; a failed gate fails the build.
    max_ppl_increase: float | None = Field(None, gt=0.0, description="e.g. 0.05: perplexity at most 5% above the student's")
    min_top1_agreement: float | None = Field(None, ge=0.0, le=1.0, description="next-token argmax agreement with the student")
    max_kl: float | None = Field(None, gt=0.0, description="mean KL(student || file) per token, nats")
    min_decode_tps: float | None = Field(None, gt=0.0, description="decode tokens/s on this machine")


class DevicesSpec(Section):
    targets: list[str] = Field(default_factory=lambda: ["host"],
                               description="device profiles to fit (see `edgedistill devices list`)")
    context: int | None = Field(None, ge=16, le=1_048_576, description="context length; default: each profile's")
    ppl_tolerance: float = Field(0.01, ge=0.0, le=1.0,
                                 description="files within this relative perplexity of the best count as equal; "
                                             "the fastest of them is chosen")

    @field_validator("targets")
    def _known(cls, v: list[str]) -> list[str]:
        from .devices.profiles import known_devices
        unknown = [d for d in v if d not in known_devices()]
        if unknown:
            raise ValueError(f"unknown device(s) {unknown}; known devices: {known_devices()}")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate devices in {v}")
        return v


class RoutingSpec(Section):
    """Adaptive thinking + escalation: adapt the teacher and student on the reasoning suite, calibrate router.json."""
    # On by default (issue #5: the default build adapts SmolLM2-135M and its student and calibrates the router);
    # `routing: {enabled: false}` skips its three stages. Wall time of each: README, "Measured".
    enabled: bool = Field(True, description="adapt teacher and student on the suite's hybrid data and calibrate router.json")
    seed: int = 0
    train_size: int = Field(400, ge=4, le=1_000_000, description="suite problems for training (each: a thinking and a direct sample)")
    calib_size: int = Field(240, ge=8, le=100_000, description="problems the escalation threshold is calibrated on")
    think_calib_size: int = Field(80, ge=4, le=100_000, description="of those, the ones also answered with thinking "
                                  "(the think threshold's sample; the rest think only where the policy says so)")
    test_size: int = Field(100, ge=4, le=100_000, description="held-out problems for the routing evaluation")
    teacher_steps: int = Field(24, ge=1, le=1_000_000, description="full fine-tune steps of the teacher on hybrid data")
    teacher_lr: float = Field(1e-4, gt=0.0, lt=1.0)
    teacher_ce_weight: float = Field(0.8, ge=0.0, le=1.0, description="gold-token CE share; the rest is KL to the original teacher (keeps it close)")
    student_steps: int = Field(24, ge=1, le=1_000_000, description="hybrid distillation steps of the student")
    student_lr: float = Field(3e-4, gt=0.0, lt=1.0)
    student_ce_weight: float = Field(0.5, ge=0.0, le=1.0, description="gold-trace CE share; the rest is logit KD from the adapted teacher")
    sequence_kd_fraction: float = Field(0.0, ge=0.0, le=1.0, description="share of student batches on the adapted teacher's own traces")
    batch_size: int = Field(8, ge=1, le=4096)
    seq_len: int = Field(256, ge=32, le=32768, description="longest hybrid sample (tokens)")
    think_budget: int = Field(128, ge=1, le=32768, description="max thinking tokens in evaluation and in router.json")
    teacher_mode: Literal["auto", "on", "off"] = Field(
        "auto", description="the large model's think mode on escalation; auto: thinking only where its gain on calibration beats think_max_acc_loss by one standard error")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="hybrid training; auto: bf16 autocast on a GPU or a CPU with native bf16 (AMX / AVX512-BF16)")
    slots: int = Field(16, ge=1, le=256, description="sequences llama.cpp decodes together while answering the suite")
    answer_tokens: int = Field(32, ge=1, le=4096, description="max answer tokens: direct, or on top of think_budget when thinking (as served: one max_tokens)")
    think_max_acc_loss: float = Field(0.01, ge=0.0, le=1.0, description="adaptive thinking may lose at most this accuracy vs always-think on calibration")
    target_accuracy_ratio: float | None = Field(None, gt=0.0, le=1.0, description="routed accuracy ≥ this × teacher-only accuracy")
    max_escalation_rate: float | None = Field(None, ge=0.0, le=1.0, description="escalate at most this share of requests (default target: 0.25)")
    token_budget: float | None = Field(None, gt=0.0, description="mean generated tokens per request, small + large model")

    @model_validator(mode="after")
    def _one_target(self) -> "RoutingSpec":
        given = [k for k in ("target_accuracy_ratio", "max_escalation_rate", "token_budget") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"routing: give exactly one target, got {given}; keep one of them")
        return self

    def target(self) -> tuple[str, float]:
        """The calibration target: the one given, else max_escalation_rate 0.25."""
        for k in ("target_accuracy_ratio", "max_escalation_rate", "token_budget"):
            if getattr(self, k) is not None:
                return k, float(getattr(self, k))
        return "max_escalation_rate", 0.25


class Recipe(Section):
    # not "." or "..": the name becomes the folder out/<name>, which must stay inside out/
    name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]*[A-Za-z0-9_-][A-Za-z0-9_.-]*$", max_length=64)
    teacher: TeacherSpec = Field(default_factory=TeacherSpec)
    student: StudentSpec = Field(default_factory=StudentSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    distill: DistillSpec = Field(default_factory=DistillSpec)
    compress: CompressSpec = Field(default_factory=CompressSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    devices: DevicesSpec = Field(default_factory=DevicesSpec)
    routing: RoutingSpec = Field(default_factory=RoutingSpec)

    @model_validator(mode="after")
    def _codes_are_exported(self) -> "Recipe":
        c = self.compress
        if c.method in ("gptq", "sparsegpt") and c.grid and c.grid not in self.export.gguf:
            raise ValueError(f"compress.grid is {c.grid} but export.gguf {self.export.gguf} does not list it, so its "
                             f"codes would never be written; add {c.grid} to export.gguf")
        qa = self.distill.quantize_aware
        if c.method == "qat":
            if qa is None:
                raise ValueError("compress.method 'qat' passes through the codes of a quantize-aware student; set "
                                 "distill.quantize_aware (q8_0, q4_0 or q4_1) or pick another compress.method")
            if qa not in self.export.gguf:
                raise ValueError(f"compress.method 'qat' keeps the student's {qa} codes but export.gguf "
                                 f"{self.export.gguf} does not list {qa}, so they would never be written; add it")
        elif qa in ("q4_0", "q4_1") and qa in self.export.gguf and c.method in ("q8_0", "none"):
            raise ValueError(f"distill.quantize_aware is {qa} and export.gguf lists {qa}, but compress.method "
                             f"'{c.method}' would re-quantize the trained weights; set compress.method: qat to write "
                             f"the student's own {qa} codes bit for bit")
        return self

    # --quick: (section, field) -> the most it may be
    QUICK_CAPS: ClassVar[dict[tuple[str, str], int]] = {
        ("distill", "steps"): 30, ("distill", "warmup_steps"): 3, ("student", "calib_windows"): 4,
        ("eval", "windows"): 8, ("compress", "calib_windows"): 8, ("data", "max_chars"): 600_000,
        ("routing", "teacher_steps"): 6, ("routing", "student_steps"): 6, ("routing", "train_size"): 100,
        ("routing", "calib_size"): 48, ("routing", "think_calib_size"): 24, ("routing", "test_size"): 32,
        ("routing", "think_budget"): 64}

    def quick(self) -> "Recipe":
        """Same recipe with small step counts: a few minutes on 2 cores (6 min 10 s on the reference machine)."""
        r = self.model_copy(deep=True)
        for (section, name), cap in self.QUICK_CAPS.items():
            part = getattr(r, section)
            setattr(part, name, min(getattr(part, name), cap))
        return r


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "<recipe>"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"recipe field '{loc}': unknown key. Remove it or check its spelling (see `edgedistill recipe --show-defaults`)."
    got = err.get("input")
    got_s = repr(got) if not isinstance(got, dict) else "a mapping"
    return f"recipe field '{loc}': {err['msg']} (got {got_s}). Fix the value or remove it to use the default."


def parse_recipe(data: dict[str, Any] | None, *, base_dir: Path | None = None) -> Recipe:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe: expected a YAML mapping at the top level, got {type(data).__name__}.")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        lines = [_describe(err) for err in e.errors()]
        raise RecipeError("invalid recipe:\n  " + "\n  ".join(lines)) from None
    _check_paths(recipe, base_dir or Path.cwd())
    return recipe


def _looks_like_path(s: str) -> bool:
    return s.startswith((".", "/", "~")) or s.endswith(".gguf") or Path(s).suffix in {".txt", ".md", ".rst", ".jsonl"}


def _check_paths(recipe: Recipe, base: Path) -> None:
    """Files named in the recipe must exist before any work starts."""
    def resolve(field: str, value: str) -> str:
        p = Path(value).expanduser()
        if not p.is_absolute():
            p = base / p
        try:
            exists = p.exists()
        except (OSError, ValueError) as e:  # a NUL byte, a name too long for the filesystem
            raise RecipeError(f"recipe field '{field}': '{value[:200]}' is not a usable path ({e}).") from None
        if not exists:
            raise RecipeError(
                f"recipe field '{field}': file or folder '{value}' does not exist (looked at {p}). "
                "Give an existing path, or a model id for models.")
        return str(p.resolve())

    if recipe.teacher.model != DEFAULT_TEACHER and _looks_like_path(recipe.teacher.model):
        recipe.teacher.model = resolve("teacher.model", recipe.teacher.model)
    if recipe.student.model and _looks_like_path(recipe.student.model):
        recipe.student.model = resolve("student.model", recipe.student.model)
    if recipe.data.source != "stdlib":
        recipe.data.source = resolve("data.source", recipe.data.source)
    for name in ("chat_data", "prompts"):
        if getattr(recipe.distill, name):
            setattr(recipe.distill, name, resolve(f"distill.{name}", getattr(recipe.distill, name)))


def load_recipe(path: str | Path | None) -> Recipe:
    if path is None:
        return Recipe()
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file '{path}' not found. Pass an existing YAML file, or no argument for the default build.")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe file '{path}' is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8.") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe file '{path}' is not valid YAML: {e}") from None
    return parse_recipe(data, base_dir=p.parent.resolve())
