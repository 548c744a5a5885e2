"""The config dataclasses of the command-line stages. YAML files in this folder fill them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..quantizers import QuantConfig


@dataclass
class SamplerSettings:
    """How a stage samples: the scheduler, its steps and η, which seeds, how many and how many at a time. Every
    stage that samples (calibrate, quantize, train, export's PTQD measurement, eval) takes these six keys under the
    same names; each stage's block sets its own defaults."""

    scheduler: Literal["ddim", "ddpm", "dpm", "own"] = "ddim"  # own: the model folder's scheduler, as is
    steps: int = 50
    eta: float = 0.0
    num_samples: int = 16
    seed: int = 0  # samples use seeds seed, seed+1, ...
    batch_size: int = 16

    def __post_init__(self):
        for key in ("steps", "num_samples", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")


@dataclass
class CalibrationConfig(SamplerSettings):
    """Which sampler inputs the activation ranges are calibrated on (Q-Diffusion §3.1: data-free)."""

    num_samples: int = 32
    every: int = 5  # keep every k-th step of each trajectory (Q-Diffusion's uniform interval)

    def __post_init__(self):
        super().__post_init__()
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")


@dataclass
class SamplingConfig(SamplerSettings):
    """How FP and quantized models are compared: same seeds, same sampler."""

    seed: int = 10_000  # disjoint from calibration seeds


@dataclass
class QuantizeRunConfig:
    """`qdistill quantize`: post-training quantization of one model folder, judged against FP."""

    model: str = "assets/teacher"
    out: str = "runs/quantized"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when torch sees a GPU
    method: Literal["rtn"] = "rtn"
    quant: QuantConfig = field(default_factory=QuantConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class SensitivityConfig:
    """`qdistill sensitivity`: per quantized layer and attention processor, the noise-prediction error against FP
    with only it quantized and with only it left in FP, overall and per timestep bucket, on calibration rows."""

    model: str = "assets/teacher"
    trajectories: str = "runs/trajectories"  # recorded by `qdistill calibrate` from the same model
    out: str = "runs/sensitivity"
    quantized: str | None = None  # a trained model (a run folder or its quantized/); None: RTN ranges per `quant`
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when torch sees a GPU
    quant: QuantConfig = field(default_factory=QuantConfig)  # RTN's quantization (ignored with `quantized`)
    init_rows: int = 1024  # calibration rows (strided over all shards) for RTN's activation ranges
    rows: int = 256  # calibration rows (strided over all shards) the errors are measured on
    batch_size: int = 64
    buckets: int = 4  # timestep buckets, equal parts of the training timesteps
    top: int = 20  # units in the printed table and the chart (the JSON and the Markdown file have all)
    seed: int = 0  # the RNG of RTN's activation-range subsample

    def __post_init__(self):
        for key in ("init_rows", "rows", "batch_size", "buckets", "top"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")


@dataclass
class TrajectoryConfig(SamplerSettings):
    """`qdistill calibrate`: FP sampler trajectories of a model folder, recorded as sharded datasets."""

    num_samples: int = 256
    batch_size: int = 32  # one shard per batch; batch i is recorded by rank i % N
    model: str = "assets/teacher"
    out: str = "runs/trajectories"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when torch sees a GPU
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16: sampler forwards under autocast; rows fp32
    selection: Literal["all", "uniform", "random"] = "uniform"
    every: int = 5  # uniform: steps 0, k, 2k, ... of every trajectory (Q-Diffusion)
    random_per_sample: int = 10  # random: this many distinct steps per trajectory, drawn from its seed (PTQD)
    prompts: str | None = None  # text-conditional models: text file, JSONL or saved datasets folder
    negative_prompt: str = ""  # "": the pipeline's own unconditional embedding (as `qdistill eval` samples)
    guidance_scale: float = 1.0  # > 1: classifier-free guidance, the negative embedding is recorded too
    sample_size: int = 0  # latent height = width; 0: the model config's sample_size (Flux has none: 64, 512 px)
    overwrite: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.sample_size < 0:
            raise ValueError(f"sample_size must be >= 0 (0: the model's), got {self.sample_size}")
        for key in ("every", "random_per_sample"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.selection == "random" and self.random_per_sample > self.steps:
            raise ValueError(f"random_per_sample ({self.random_per_sample}) exceeds steps ({self.steps})")


@dataclass
class DistillConfig:
    """Block-wise knowledge distillation (docs/design.md §3.5). The paper's recipe: batch 32, 5K iterations.
    Data, caching, checkpoints, logging and the seed serve every recipe; `iterations`, `lr_weights`,
    `lr_quant` and `lr_schedule` are the dilatequant recipe's (qdiffusion reads its own section)."""

    iterations: int = 5000  # per block
    batch_size: int = 32  # global, in calibration rows: >= the shard count, a multiple of the rank count
    lr_weights: float = 1e-4  # full weights and biases (Adam)
    lr_quant: float = 1e-3  # step sizes, relative: times each quantizer's mean step size; zero points
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    block_input: Literal["quantized", "fp"] = "quantized"  # DilateQuant trains on the quantized chain's input
    cache_mb: int = 2048  # per rank, device memory for carried block outputs and a block's inputs/targets of all rows
    cache_disk_mb: int = 32768  # per rank, local disk for what cache_mb does not hold (memory-mapped; 0: none)
    cache_dir: str | None = None  # where cache_disk_mb is spent; None: the system's temporary directory
    capture: Literal["carry", "prefix"] = "carry"  # carry block outputs forward, or run the model up to each block
    init_rows: int = 1024  # calibration rows (from all shards, strided) for the per-timestep TPQ init
    checkpoint_every: int = 500  # iterations inside a block; a checkpoint is also written after every block
    log_every: int = 10
    seed: int = 0
    max_blocks: int | None = None  # train only the first N blocks (a smoke run at full size); None: all
    keep_best: bool = True  # never worse: each phase of a block keeps its best state on the held-out batch
    eval_every: int = 100  # iterations between held-out evaluations inside a phase (keep_best); 0: its end only
    # end-to-end distillation after the blocks (trainer/end_to_end.py): the whole model against FP's noise prediction
    e2e_iterations: int = 0  # 0: off
    e2e_lr_weights: float = 1e-4  # every weight and bias of the model (Adam)
    e2e_lr_quant: float = 1e-3  # step sizes, relative to each quantizer's mean step size; zero points
    e2e_inputs: Literal["fp", "quantized"] = "fp"  # x_t from the FP trajectories, or the quantized model's own
    e2e_checkpointing: bool = False  # activation checkpointing (the model's own, diffusers') in this phase

    def __post_init__(self):
        if self.eval_every < 0:
            raise ValueError(f"distill.eval_every must be >= 0 (0: at the end of each phase only), got {self.eval_every}")
        if self.max_blocks is not None and self.max_blocks < 1:
            raise ValueError(f"distill.max_blocks must be >= 1 or null, got {self.max_blocks}")
        for key in ("iterations", "batch_size", "init_rows", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"distill.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("cache_mb", "cache_disk_mb"):
            if getattr(self, key) < 0:
                raise ValueError(f"distill.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("lr_weights", "lr_quant", "e2e_lr_weights", "e2e_lr_quant", "e2e_iterations"):
            if getattr(self, key) < 0:
                raise ValueError(f"distill.{key} must be >= 0, got {getattr(self, key)}")


@dataclass
class QDiffusionConfig:
    """Q-Diffusion's block reconstruction (docs/design.md §3.6), per block: AdaRound on the weights, then the
    activation step sizes. The paper: 20K and 5K iterations, batch 32."""

    rounding_iterations: int = 20000  # per block, phase 1
    act_iterations: int = 5000  # per block, phase 2
    lr_rounding: float = 1e-3  # Adam on AdaRound's α, constant (Q-Diffusion: Adam's default)
    rounding_lambda: float = 0.01  # λ, weight of the rounding regulariser against the lp (p = rounding_p) loss
    beta_start: float = 20.0  # regulariser exponent when the warm-up ends ...
    beta_end: float = 2.0  # ... and at the last iteration (linear in between)
    warmup: float = 0.2  # share of phase-1 iterations with the regulariser off
    rounding_p: float = 2.0  # lp exponent of the phase-1 block-output loss
    lr_act: float = 4e-4  # Adam on activation step sizes, absolute, cosine decay to 0
    act_p: float = 2.4  # lp exponent of the phase-2 block-output loss

    def __post_init__(self):
        for key in ("rounding_iterations", "act_iterations"):
            if getattr(self, key) < 1:
                raise ValueError(f"qdiffusion.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("lr_rounding", "rounding_lambda", "lr_act"):
            if getattr(self, key) < 0:
                raise ValueError(f"qdiffusion.{key} must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"qdiffusion.warmup must be in [0, 1), got {self.warmup}")
        for key in ("rounding_p", "act_p"):
            if getattr(self, key) <= 0:
                raise ValueError(f"qdiffusion.{key} must be > 0, got {getattr(self, key)}")


@dataclass
class TrainConfig:
    """`qdistill train`: block-wise training of a quantized copy of a model folder on its calibration
    trajectories, by the training method named in `method`: `dilatequant` (Weight Dilation + TPQ + BKD, `distill.*`) or
    `qdiffusion` (AdaRound, then activation step sizes, `qdiffusion.*`)."""

    model: str = "assets/teacher"
    trajectories: str = "runs/trajectories"  # recorded by `qdistill calibrate` from the same model
    out: str = "runs/dilatequant-w4a4"
    method: Literal["dilatequant", "qdiffusion"] = "dilatequant"
    deepspeed: str = "zero2.json"  # a DeepSpeed JSON: a path, or a file name in qdistill's configs folder
    overwrite: bool = False  # start over even if `out` holds a checkpoint (default: resume from it)
    threads: int | None = None  # torch threads per rank (torchrun sets 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when torch sees a GPU (rank r: GPU r % count)
    # bf16/fp16: forwards under autocast (fp16: DeepSpeed's dynamic loss scaling); weights, quantizers, loss, Adam fp32
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    timeout_minutes: float = 60.0  # collective timeout (rank 0 writes checkpoints while the others wait)
    quant: QuantConfig = field(default_factory=QuantConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    qdiffusion: QDiffusionConfig = field(default_factory=QDiffusionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class MeasureConfig(SamplerSettings):
    """The FP sampler trajectories (every step kept) that PTQD's statistics and the mixed-precision schedule
    are measured on: use the sampler the model will sample with."""

    scheduler: Literal["ddim", "ddpm"] = "ddim"
    num_samples: int = 64
    seed: int = 200_000  # trajectories use seeds seed, seed+1, ... (apart from calibration's and eval's)


@dataclass
class MixedPrecisionConfig:
    """PTQD's step-aware mixed precision: each sampler step runs the model as trained (low precision) or with
    its low-bit activations at `act_bits`, and optionally its low-bit weights at `weight_bits` (a second weight
    copy in the export, quantized from the FP model), chosen by PTQD's noise rule under `bops_budget`."""

    enabled: bool = False
    bops_budget: float | None = None  # bit-operations of a sampling run relative to the FP model's, e.g. 0.025
    act_bits: int = 8
    weight_bits: int | None = None  # None: weights keep their bits on every step (one weight copy)
    weight_source: Literal["fp", "trained"] = "fp"  # what the copy quantizes: the FP model's weights (dilated
    # like the layer's) or the run's own float weights (AdaRound's sit on their 4-bit grid: use fp there)

    def __post_init__(self):
        if self.bops_budget is not None and self.bops_budget <= 0:
            raise ValueError(f"mixed_precision.bops_budget must be > 0, got {self.bops_budget}")
        for key in ("act_bits", "weight_bits"):
            value = getattr(self, key)
            if value is not None and not 2 <= value <= 8:
                raise ValueError(f"mixed_precision.{key} must be in 2..8, got {value}")


@dataclass
class ExportConfig:
    """`qdistill export`: a run's quantized model as a packed integer export, optionally with PTQD's noise
    correction (the `ptqd` and `dilatequant+ptqd` recipes) and step-aware mixed precision."""

    run: str = ""  # a run folder (holding quantized/) or a quantized folder
    out: str = ""  # default: RUN/export
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when torch sees a GPU
    recipe: str | None = None  # the name recorded in the export; default the run's (+ "+ptqd" with noise correction)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16: PTQD's forwards under autocast
    noise_correction: bool = False  # measure and store PTQD's per-step statistics (`qdistill eval` samples with them)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    mixed_precision: MixedPrecisionConfig = field(default_factory=MixedPrecisionConfig)
    format: Literal["qdistill", "onnx"] = "qdistill"  # onnx: also OUT/onnx/, QDQ graphs for ONNX Runtime/TensorRT
    onnx_groups: int = 1  # format=onnx: static activation sets, one graph each (timestep groups from the TPQ tables)

    def __post_init__(self):
        if isinstance(self.onnx_groups, bool) or not isinstance(self.onnx_groups, int) or self.onnx_groups < 1:
            raise ValueError(f"onnx_groups must be an integer >= 1 (graphs, one per timestep group), got "
                             f"{self.onnx_groups!r}")
        if self.format == "onnx" and self.mixed_precision.enabled:
            raise ValueError("format=onnx does not take mixed_precision.enabled=true: its per-step bit-widths and "
                             "second weight copies have no static ONNX form")


@dataclass
class EvalConfig(SamplerSettings):
    """`qdistill eval`: judge an export (`qdistill export`) on fixed seeds against the data and the FP model.
    Reads only export folders and, optionally, the FP model folder."""

    num_samples: int = 256
    seed: int = 100_000  # samples use seeds seed, seed+1, ...
    batch_size: int = 64

    model: str = ""  # the export folder
    reference: str | None = None  # the FP model folder: fidelity metrics (PSNR, SSIM, noise MSE) and ΔFD
    out: str = ""  # folder for metrics.json, samples.png and tb/; default MODEL/eval
    mode: Literal["integer", "simulated"] = "integer"  # int8 kernels, or float kernels bit-exact with training
    compile: bool = False  # integer mode through torch.compile (one graph for every step; the first call compiles)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when present (integer on CUDA: _int_mm linears)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16: FP and simulated forwards under autocast
    ptqd: bool | None = None  # PTQD's noise-corrected sampler for the quantized model; None: when the export has it
    fidelity_samples: int = 16  # seeds whose FP trajectory gives the per-step noise-prediction MSE
    classifier: str = "assets/classifier"  # bench classifier folder (FD features, 1×32×32 models)
    inception: str | None = None  # a local TorchScript / torch.export feature network file: FID, sFID, IS
    clip: str | None = None  # a local CLIP model folder: CLIP score (text-conditional models)
    prompts: str | None = None  # text file, one prompt per line (text-conditional models)
    guidance_scale: float = 7.5
    sample_size: int = 0  # latent height = width; 0: the model config's sample_size (Flux: 64); as calibrated
    cache_dir: str | None = None  # FP reference cache; default ~/.cache/qdistill/fp_reference

    def __post_init__(self):
        super().__post_init__()
        if self.sample_size < 0:
            raise ValueError(f"sample_size must be >= 0 (0: the model's), got {self.sample_size}")
        if self.fidelity_samples < 1:
            raise ValueError(f"fidelity_samples must be >= 1, got {self.fidelity_samples}")
        if self.compile and self.mode != "integer":
            raise ValueError(f"compile=true is integer mode's compiled path; got mode={self.mode}")
