"""rwkvx-lightning: train RWKV-X hybrid language models (RWKV-7 + top-k chunk sparse attention).

`RWKVX`, `ModelConfig` and `Tokenizer` are imported on first use, so `rwkvx data ...` starts
without loading torch.
"""

__all__ = ["RWKVX", "ModelConfig", "Tokenizer"]
__version__ = "0.1.0"


def __getattr__(name):
    if name in ("RWKVX", "ModelConfig"):
        from rwkvx_lightning import model

        return getattr(model, name)
    if name == "Tokenizer":
        from rwkvx_lightning.tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(f"module 'rwkvx_lightning' has no attribute {name!r}")
