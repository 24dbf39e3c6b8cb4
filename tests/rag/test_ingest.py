from selfhost.rag.chunk import chunk_text
from selfhost.rag.ingest import ingest
from selfhost.rag.store import VectorStore
from tests.rag.corpus import DOCUMENTS, write_corpus


def _expected_chunks(folder, embedder, chunking):
    """(path, position) -> text for every readable file now on disk, chunked independently."""
    expected = {}
    for path in sorted(folder.iterdir()):
        for i, text in enumerate(chunk_text(path.read_text(), embedder.count_tokens, chunking)):
            expected[(str(path), i)] = text
    return expected


def _stored_chunks(store, collection):
    return {(c.path, c.chunk_index): c.text for _, c in store.chunks(collection)}


def test_reindex_after_edit_add_delete_leaves_exactly_the_right_chunks(tmp_path, embedder):
    from selfhost.rag.chunk import ChunkConfig

    docs = write_corpus(tmp_path / "docs")
    # Small chunks so one edited file spans several chunks.
    chunking = ChunkConfig(max_tokens=24, overlap_tokens=6)
    with VectorStore(tmp_path / "store") as store:
        first = ingest([docs], store, "c", embedder, chunking)
        assert len(first.added) == len(DOCUMENTS) and first.unchanged == 0
        assert _stored_chunks(store, "c") == _expected_chunks(docs, embedder, chunking)

        again = ingest([docs], store, "c", embedder)
        assert (again.added, again.updated, again.removed, again.num_chunks_written) == ([], [], [], 0)
        assert again.unchanged == len(DOCUMENTS)

        (docs / "chess.txt").write_text("Chess openings: the Sicilian Defence begins 1.e4 c5. " * 3)
        (docs / "bees.txt").write_text("Bees make honey.")  # fewer chunks than before
        (docs / "kites.txt").write_text("Kites fly best in steady wind on open beaches.")
        (docs / "tides.txt").unlink()
        (docs / "jazz.txt").unlink()
        changed = ingest([docs], store, "c", embedder)
        assert changed.added == [str(docs / "kites.txt")]
        assert sorted(changed.updated) == [str(docs / "bees.txt"), str(docs / "chess.txt")]
        assert changed.removed == [str(docs / "jazz.txt"), str(docs / "tides.txt")]
        assert changed.unchanged == len(DOCUMENTS) - 4

        expected = _expected_chunks(docs, embedder, chunking)
        assert _stored_chunks(store, "c") == expected
        assert store.count("c") == changed.num_chunks_total == len(expected)


def test_files_outside_the_given_roots_are_kept(tmp_path, embedder):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "one.txt").write_text("Volcanoes erupt lava.")
    (b / "two.txt").write_text("Glaciers carve valleys.")
    with VectorStore(tmp_path / "store") as store:
        ingest([a], store, "c", embedder)
        ingest([b], store, "c", embedder)
        (b / "two.txt").unlink()
        report = ingest([b], store, "c", embedder)
        assert report.removed == [str(b / "two.txt")]
        assert {c.path for _, c in store.chunks("c")} == {str(a / "one.txt")}


def test_keyword_index_follows_reindex(tmp_path, embedder):
    from selfhost.rag.retrieve import Retriever

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "x.txt").write_text("Zanzibar spice markets sell cloves.")
    with VectorStore(tmp_path / "store") as store:
        ingest([docs], store, "c", embedder)
        assert Retriever(store, "c", embedder).search("zanzibar", mode="keyword")
        (docs / "x.txt").write_text("Reykjavik has geothermal pools.")
        ingest([docs], store, "c", embedder)
        retriever = Retriever(store, "c", embedder)
        assert retriever.search("zanzibar", mode="keyword") == []
        assert retriever.search("reykjavik", mode="keyword")[0].chunk.text.startswith("Reykjavik")


def test_collection_keeps_its_model_and_chunking(tmp_path, embedder):
    import pytest

    from selfhost.errors import InvalidParameterError
    from selfhost.rag.chunk import ChunkConfig

    docs = write_corpus(tmp_path / "docs")
    with VectorStore(tmp_path / "store") as store:
        ingest([docs], store, "c", embedder, ChunkConfig(max_tokens=64, overlap_tokens=8))
        with pytest.raises(InvalidParameterError, match="uses chunks of 64 tokens"):
            ingest([docs], store, "c", embedder, ChunkConfig(max_tokens=100, overlap_tokens=8))
        with pytest.raises(InvalidParameterError, match="do not fit"):
            ingest([docs], store, "d", embedder, ChunkConfig(max_tokens=400, overlap_tokens=8))
        assert store.info("c").settings == {"max_tokens": 64, "overlap_tokens": 8}
        from selfhost.rag.embed import Embedder

        same_weights_other_name = Embedder(str(embedder.folder))
        with pytest.raises(InvalidParameterError, match="built with embedding model 'all-MiniLM-L6-v2'"):
            ingest([docs], store, "c", same_weights_other_name)
