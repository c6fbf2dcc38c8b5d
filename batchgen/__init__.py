"""batchgen: run an LLM over a whole dataset."""
from batchgen.outputs import CompletionOutput, RequestOutput
from batchgen.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name):
    # LLM pulls in torch and the engine; keep `import batchgen` light for the CLI's --help.
    if name == "LLM":
        from batchgen.llm import LLM
        return LLM
    raise AttributeError(name)
