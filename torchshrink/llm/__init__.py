"""Language models: loading (zoo:smollm2, local Hugging Face causal-LM folders, GGUF files), real
English prose for calibration and evaluation, perplexity, and weight-only quantization."""

from torchshrink.llm.models import causal_lm, load_causal_lm, smollm2_gguf
from torchshrink.llm.perplexity import generate_check, perplexity, token_windows
from torchshrink.llm.text import PROSE_SOURCES, prose_split

__all__ = [
    "PROSE_SOURCES", "causal_lm", "generate_check", "load_causal_lm", "perplexity", "prose_split", "smollm2_gguf",
    "token_windows",
]
