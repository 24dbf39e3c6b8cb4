import pytest

from selfhost.rag.embed import Embedder
from selfhost.rag.ingest import ingest
from selfhost.rag.retrieve import Retriever
from selfhost.rag.store import VectorStore
from tests.rag.corpus import write_corpus


@pytest.fixture(scope="session")
def embedder():
    return Embedder()  # the bundled all-MiniLM-L6-v2: no network


@pytest.fixture(scope="session")
def corpus_store(tmp_path_factory, embedder):
    """The topic corpus indexed once into collection `topics`; yields (store, docs folder)."""
    root = tmp_path_factory.mktemp("rag")
    docs = write_corpus(root / "docs")
    store = VectorStore(root / "store")
    ingest([docs], store, "topics", embedder)
    yield store, docs
    store.close()


@pytest.fixture(scope="session")
def retriever(corpus_store, embedder):
    store, _ = corpus_store
    return Retriever(store, "topics", embedder)
