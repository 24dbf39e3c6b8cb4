import pytest
from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

from selfhost.errors import InvalidParameterError
from selfhost.rag.readers import find_documents, read_document


def _write_pdf(path, lines):
    """A one-page PDF whose text layer holds `lines` (Helvetica), built with pypdf alone."""
    writer = PdfWriter()
    page = writer.add_blank_page(width=612, height=792)
    font = DictionaryObject(
        {
            NameObject("/Type"): NameObject("/Font"),
            NameObject("/Subtype"): NameObject("/Type1"),
            NameObject("/BaseFont"): NameObject("/Helvetica"),
        }
    )
    page[NameObject("/Resources")] = DictionaryObject(
        {NameObject("/Font"): DictionaryObject({NameObject("/F1"): writer._add_object(font)})}
    )
    ops = "".join(f"BT /F1 12 Tf 72 {700 - 20 * i} Td ({line}) Tj ET\n" for i, line in enumerate(lines))
    stream = DecodedStreamObject()
    stream.set_data(ops.encode())
    page[NameObject("/Contents")] = writer._add_object(stream)
    with open(path, "wb") as f:
        writer.write(f)


def test_html_keeps_visible_text_in_blocks(tmp_path):
    page = tmp_path / "p.html"
    page.write_text(
        "<html><head><title>T</title><style>p{color:red}</style></head><body>"
        "<h1>Volcanoes</h1><p>Lava is   molten\nrock.</p><script>var x = 1;</script>"
        "<ul><li>Basalt</li><li>Obsidian &amp; pumice</li></ul></body></html>"
    )
    assert read_document(page) == "Volcanoes\n\nLava is molten rock.\n\nBasalt\n\nObsidian & pumice"


def test_pdf_text_is_extracted(tmp_path):
    pdf = tmp_path / "doc.pdf"
    _write_pdf(pdf, ["Glaciers carve valleys.", "Ice moves slowly."])
    text = read_document(pdf)
    assert "Glaciers carve valleys." in text and "Ice moves slowly." in text


def test_markdown_and_text_are_read_verbatim(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\nBody text.")
    assert read_document(tmp_path / "a.md") == "# Title\n\nBody text."


def test_find_documents_walks_folders_and_skips_hidden_and_unknown(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("b")
    (tmp_path / "sub" / "c.png").write_bytes(b"\x89PNG")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "d.txt").write_text("d")
    assert [p.name for p in find_documents([tmp_path])] == ["a.txt", "b.md"]
    with pytest.raises(InvalidParameterError, match="no such file"):
        find_documents([tmp_path / "missing"])
    with pytest.raises(InvalidParameterError, match="unsupported suffix '.png'"):
        find_documents([tmp_path / "sub" / "c.png"])
