"""EASE: Efficient Asymmetric Supervision for Early-Exit Transformers."""

from .config import (
    PRESETS,
    TrainingConfig,
    create_asymmetric_config,
    create_deep_supervision_config,
    create_layerskip_config,
    create_linear_depth_config,
    create_preset_config,
    create_standard_config,
    lr_scale_schedule,
)
from .data import Corpus, TokenBatches, load_corpus, set_seed, set_threads
from .generation import generate, generate_self_speculative
from .models import DeepSupervisionTransformer, ModelConfig, StandardTransformer, TransformerLM
from .trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "Corpus",
    "DeepSupervisionTransformer",
    "ModelConfig",
    "StandardTransformer",
    "TokenBatches",
    "Trainer",
    "TrainingConfig",
    "TransformerLM",
    "create_asymmetric_config",
    "create_deep_supervision_config",
    "create_layerskip_config",
    "create_linear_depth_config",
    "create_preset_config",
    "create_standard_config",
    "generate",
    "generate_self_speculative",
    "load_corpus",
    "lr_scale_schedule",
    "set_seed",
    "set_threads",
]
