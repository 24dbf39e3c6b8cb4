"""The issue's targets on the shipped demo model (skipped until the model is in the package).

int8 perplexity within +1% of fp32 and int4 within +5%; weight memory
int8 <= 0.3x and int4 <= 0.17x of fp32, scales and zero points counted.
"""

import pytest

from selfhost import LLM
from selfhost.hub import EMBEDDED_MODEL_DIR
from selfhost.quant.apply import weight_bytes
from selfhost.quant.perplexity import perplexity

pytestmark = pytest.mark.skipif(not (EMBEDDED_MODEL_DIR / "config.json").exists(), reason="demo model not shipped yet")

# Hamlet, Act 3 Scene 1 (public domain).
PASSAGE = """HAMLET:
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die: to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to, 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep: perchance to dream: ay, there's the rub;
For in that sleep of death what dreams may come
When we have shuffled off this mortal coil,
Must give us pause: there's the respect
That makes calamity of so long life;
For who would bear the whips and scorns of time,
The oppressor's wrong, the proud man's contumely,
The pangs of despised love, the law's delay,
The insolence of office and the spurns
That patient merit of the unworthy takes,
When he himself might his quietus make
With a bare bodkin? who would fardels bear,
To grunt and sweat under a weary life,
But that the dread of something after death,
The undiscover'd country from whose bourn
No traveller returns, puzzles the will
And makes us rather bear those ills we have
Than fly to others that we know not of?
Thus conscience does make cowards of us all;
And thus the native hue of resolution
Is sicklied o'er with the pale cast of thought,
And enterprises of great pith and moment
With this regard their currents turn awry,
And lose the name of action.
"""


@pytest.fixture(scope="module")
def fp32():
    llm = LLM(device="cpu", max_num_seqs=1)
    ids = llm.tokenizer.encode(PASSAGE)
    window = min(llm.max_model_len, 256)
    return ids, window, perplexity(llm.model, ids, window).perplexity, weight_bytes(llm.model)


@pytest.mark.parametrize("method,ppl_bound,memory_bound", [("int8", 0.01, 0.30), ("int4", 0.05, 0.17)])
def test_demo_model_meets_the_targets(fp32, method, ppl_bound, memory_bound):
    ids, window, base_ppl, base_bytes = fp32
    llm = LLM(device="cpu", max_num_seqs=1, quantization=method)
    assert perplexity(llm.model, ids, window).perplexity <= base_ppl * (1 + ppl_bound)
    assert weight_bytes(llm.model) <= memory_bound * base_bytes
