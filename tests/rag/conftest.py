import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

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


@pytest.fixture
def chat_server():
    """A loopback OpenAI-style /v1/chat/completions that echoes how many messages it got."""
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append((self.path, body))
            reply = {"choices": [{"message": {"role": "assistant", "content": "From the sources [1]."}}]}
            if body["model"] == "missing":
                self.send_response(404)
                reply = {"error": {"message": "no such model"}}
            else:
                self.send_response(200)
            payload = json.dumps(reply).encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1", received
    server.shutdown()
