import json
import subprocess
import sys

from tests.rag.corpus import write_corpus

INDEX = """
import sys
from pathlib import Path
from selfhost.rag.embed import Embedder
from selfhost.rag.ingest import ingest
from selfhost.rag.store import VectorStore
with VectorStore(Path(sys.argv[1])) as store:
    print(ingest([Path(sys.argv[2])], store, "topics", Embedder()).num_chunks_total)
"""

QUERY = """
import json, sys
from pathlib import Path
from selfhost.rag.retrieve import Retriever
from selfhost.rag.store import VectorStore
with VectorStore(Path(sys.argv[1])) as store:
    hits = Retriever(store, "topics").search("what is the event horizon", k=1)
    print(json.dumps({"count": store.count("topics"), "top": Path(hits[0].chunk.path).stem}))
"""


def _run(code, *args):
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_index_in_one_process_query_in_another(tmp_path):
    docs = write_corpus(tmp_path / "docs")
    store = tmp_path / "store"
    indexed = int(_run(INDEX, store, docs))
    answer = json.loads(_run(QUERY, store))
    assert answer == {"count": indexed, "top": "black_holes"}
