"""selfhost: run open-weight language models on your own hardware, and know what it costs.

    from selfhost import LLM, SamplingParams
    llm = LLM()  # the embedded demo model; or a folder, Hub id or alias
    print(llm.generate("To be, or not", SamplingParams(max_tokens=40))[0].text)
"""

from selfhost.outputs import RequestOutput, TokenLogprob
from selfhost.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "TokenLogprob"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Importing torch takes seconds; defer it until the engine is actually used.
    if name == "LLM":
        from selfhost.llm import LLM

        return LLM
    raise AttributeError(name)
