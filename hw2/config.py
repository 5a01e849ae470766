"""The run's configuration: one dataclass, the single source of truth.

main.py turns every field into a flag of the same name (the help text is the
field's `help`), checkpoints store it, and a model can be rebuilt from it alone.
Defaults are the homework's recommended command.
"""
import re
from dataclasses import asdict, dataclass, field, fields

CLASSES = ("all", "cat", "dog", "wild")
WANDB_MODES = ("auto", "online", "offline", "disabled")
AMP_CHOICES = ("auto", "off", "bf16", "fp16")


def flag(default, help):
    """A Config field that is also a command-line flag of the same name."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # data
    data_path: str = flag("./data/train", "folder with one subfolder of images per class (AFHQ: cat, dog, wild)")
    data_class: str = flag("cat", "which class to train on: all, cat, dog or wild")
    image_size: int = flag(32, "side of the square training images, in pixels")
    cache_dir: str = flag("./.cache", "where decoded, resized images are cached between runs")
    # model and diffusion
    unet_dim: int = flag(16, "base channel count of the U-Net")
    unet_dim_mults: tuple = flag((1, 2, 4, 8), "channel multiplier per U-Net level")
    time_steps: int = flag(50, "number of diffusion steps T")
    # optimization
    train_steps: int = flag(10000, "number of optimizer steps")
    batch_size: int = flag(32, "images per forward pass")
    gradient_accumulate_every: int = flag(2, "forward passes per optimizer step (effective batch = batch_size x this)")
    learning_rate: float = flag(1e-3, "Adam learning rate")
    seed: int = flag(2024, "seed for weights, data order, noise and samples")
    ema_decay: float = flag(0.0, "EMA of the weights, used for sampling, e.g. 0.995 (0 = off, the homework)")
    sampling_timesteps: int = flag(None, "sample with DDIM over this many steps (< time_steps); default: the full DDPM chain")
    heldout_images: int = flag(0, "training images kept out to measure a held-out denoising loss at milestones (0 = off)")
    plain: bool = flag(False, "run the homework's network as unet.py writes it, with no speed levers (hw2/fast); "
                              "checkpoints are the same either way")
    channels_last: bool = flag(None, "store U-Net feature maps channels-last (NHWC): True for every map, False for none; "
                                   "by default those of 32 x 32 px and larger while sampling on a CPU (hw2/fast)")
    amp: str = flag("auto", "mixed precision: auto (float32 on CUDA, where it is fastest for this model; bf16 on CPUs "
                            "with native bf16), off, bf16 or fp16")
    cuda_graph: bool = flag(None, "on a CUDA GPU, capture the training step and each sampling pass once in a CUDA "
                                  "graph and replay them (default: wherever they hold, unless unet.py or diffusion.py "
                                  "was edited; True: there too; False: never; docs/flags.md)")
    # outputs
    save_folder: str = flag("./results", "where checkpoints, sample images and plots go")
    save_and_sample_every: int = flag(1000, "steps between milestones (checkpoint + samples)")
    num_samples: int = flag(64, "images in each milestone's sample grid")
    keep_checkpoints: int = flag(0, "numbered milestone checkpoints to keep, newest first (0 keeps all)")
    load_path: str = flag(None, "checkpoint (or run folder) to resume from, visualize or sample; its stored settings "
                                "are the defaults, flags given override them")
    overwrite: bool = flag(False, "start a fresh run in a --save_folder that holds another run, deleting that run's files")
    fid: bool = flag(False, "compute FID against the training images at every milestone")
    fid_num_samples: int = flag(512, "generated images per FID evaluation")
    inception_path: str = flag(None, "clean-fid's inception-2015-12-05.pt, if not in cache_dir (or set $HW2_INCEPTION_PATH)")
    visualize: bool = flag(False, "render the forward and backward diffusion of a training batch from --load_path and exit")
    sample: int = flag(0, "draw this many images from --load_path's model into a folder of their own and exit (0 = off)")
    wandb: str = flag("auto", "auto (online when logged in to W&B, else offline), online, offline or disabled")
    device: str = flag("auto", "auto, cpu, cuda, cuda:N or mps")
    verbose: bool = flag(False, "also say at start how the run computes: images per sampling pass, the speed levers, "
                                "the compiled kernel, malloc")

    def __post_init__(self):
        self.unet_dim_mults = tuple(self.unet_dim_mults)

    def check(self):
        """Raise ValueError naming the first invalid value."""
        positive = ["image_size", "unet_dim", "time_steps", "train_steps", "batch_size",
                    "gradient_accumulate_every", "save_and_sample_every", "num_samples", "fid_num_samples"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning_rate must be positive, got {self.learning_rate}")
        if not self.unet_dim_mults or any(m <= 0 for m in self.unet_dim_mults):
            raise ValueError(f"--unet_dim_mults must be positive integers, got {self.unet_dim_mults}")
        if self.data_class not in CLASSES:
            raise ValueError(f"--data_class must be one of {', '.join(CLASSES)}, got {self.data_class!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.sampling_timesteps is not None and not 1 <= self.sampling_timesteps <= self.time_steps:
            raise ValueError(f"--sampling_timesteps must be between 1 and --time_steps {self.time_steps}, "
                             f"got {self.sampling_timesteps}")
        if self.heldout_images < 0:
            raise ValueError(f"--heldout_images must be 0 (off) or more, got {self.heldout_images}")
        if self.keep_checkpoints < 0:
            raise ValueError(f"--keep_checkpoints must be 0 (keep all) or more, got {self.keep_checkpoints}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        if self.wandb not in WANDB_MODES:
            raise ValueError(f"--wandb must be one of {', '.join(WANDB_MODES)}, got {self.wandb!r}")
        if self.fid and self.fid_num_samples < 2:
            raise ValueError(f"--fid_num_samples must be at least 2 for FID, got {self.fid_num_samples}")
        factor = 2 ** (len(self.unet_dim_mults) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"--image_size {self.image_size} must be divisible by {factor} "
                f"(2 to the number of U-Net levels minus one, {len(self.unet_dim_mults)} levels)"
            )
        if self.unet_dim % 8:
            raise ValueError(f"--unet_dim must be a multiple of 8 (GroupNorm uses 8 groups), got {self.unet_dim}")
        if self.visualize and not self.load_path:
            raise ValueError("--visualize needs a trained model: pass --load_path CHECKPOINT")
        if self.sample < 0:
            raise ValueError(f"--sample must be a number of images (0 = off), got {self.sample}")
        if self.sample and not self.load_path:
            raise ValueError("--sample needs a trained model: pass --load_path CHECKPOINT")
        if self.sample and self.visualize:
            raise ValueError("--sample and --visualize are separate jobs: run one, then the other")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values):
        """Rebuild from a checkpoint's dict, ignoring keys this version does not know."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# Fields that fix the shapes of the model's weights and its schedule: a checkpoint
# made with other values cannot be resumed.
MODEL_FIELDS = ("image_size", "unet_dim", "unet_dim_mults", "time_steps")

# Fields a checkpoint's stored config does not supply: what to do this time, where this
# machine keeps things, and how it computes them (the device, its precision, the levers).
# Every other field defaults to the checkpoint's value.
NOT_INHERITED = ("load_path", "overwrite", "visualize", "sample", "device", "amp", "cache_dir", "inception_path",
                 "plain", "channels_last", "cuda_graph", "verbose")
