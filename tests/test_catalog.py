"""The catalogue file: schema, line-numbered errors, ids matched one to one with entry files."""

import textwrap

import pytest

import zoo
from zoo.catalog import ENTRIES_DIR, CatalogError, catalog_path, load_catalog

GOOD = textwrap.dedent("""\
    - id: toy-attention
      title: A Toy
      authors: [A. Author]
      year: 2020
      venue: Nowhere 2020
      arxiv: "2001.00001"
      paper: https://arxiv.org/abs/2001.00001
      code: null
      family: kernel
      idea: A toy.
      formula: O = V
      complexity: {time: O(N), memory: O(N)}
      scaling: {time: 1, memory: 1}
      autoregressive: false
      masking: false
      input: sequence
      kernel: false
      hparams: {}
      citations: null
      notes: ""
    """)


def write(tmp_path, text, files=("toy_attention",)):
    entries = tmp_path / "entries"
    entries.mkdir(exist_ok=True)
    for f in files:
        (entries / f"{f}.py").write_text("")
    path = tmp_path / "catalog.yaml"
    path.write_text(text)
    return path, entries


def load(tmp_path, text, **kw):
    path, entries = write(tmp_path, text, **kw)
    return load_catalog(path, entries_dir=entries)


def test_good_record_loads(tmp_path):
    e = load(tmp_path, GOOD)["toy-attention"]
    assert e.authors == ("A. Author",) and e.line == 1 and e.scaling["time"] == 1


def error(tmp_path, text, **kw) -> CatalogError:
    with pytest.raises(CatalogError) as info:
        load(tmp_path, text, **kw)
    return info.value


def test_duplicate_id_names_both_lines(tmp_path):
    err = error(tmp_path, GOOD + GOOD)
    assert err.line == 21 and "duplicate id 'toy-attention' (first at line 1)" in str(err)
    assert str(err).startswith(f"{tmp_path / 'catalog.yaml'}:21:")


def test_duplicate_key_is_refused(tmp_path):
    err = error(tmp_path, GOOD.replace("  year: 2020\n", "  year: 2020\n  year: 2021\n"))
    assert err.line == 5 and "duplicate key 'year' (first given at line 4)" in str(err)


def test_unknown_key(tmp_path):
    err = error(tmp_path, GOOD.replace("  notes: \"\"\n", "  notes: \"\"\n  colour: red\n"))
    assert err.line == 21 and "unknown key 'colour'" in str(err)


def test_missing_key(tmp_path):
    err = error(tmp_path, GOOD.replace("  venue: Nowhere 2020\n", ""))
    assert err.line == 1 and "missing key 'venue'" in str(err)


@pytest.mark.parametrize("old, new, line, words", [
    ("family: kernel", "family: magic", 9, "key 'family' must be one of exact"),
    ("input: sequence", "input: video", 16, "key 'input' must be one of sequence, image"),
    ("year: 2020", "year: '2020'", 4, "key 'year' must be a year"),
    ("scaling: {time: 1, memory: 1}", "scaling: {time: linear, memory: 1}", 13,
     "key 'scaling' must be a mapping with time and memory, each a number"),
    ("scaling: {time: 1, memory: 1}", "scaling: {time: 1, memory: 1, ns: [64, 128]}", 13,
     "optionally ns (the lengths to measure at) with why"),
    ("autoregressive: false", "autoregressive: maybe", 14, "key 'autoregressive' must be true"),
    ('arxiv: "2001.00001"', "arxiv: 2001.00001", 6, "quoted arXiv id"),
    ("authors: [A. Author]", "authors: A. Author", 3, "key 'authors' must be a non-empty list"),
])
def test_wrong_type_or_enum(tmp_path, old, new, line, words):
    err = error(tmp_path, GOOD.replace(old, new))
    assert err.line == line and words in str(err)


def test_bad_yaml_and_tabs(tmp_path):
    err = error(tmp_path, GOOD.replace("  year: 2020", "\tyear: 2020"))
    assert err.line == 4 and "tabs" in str(err)
    err = error(tmp_path, GOOD.replace("idea: A toy.", "idea: [unclosed"))
    assert err.line is not None and "not valid YAML" in str(err)


def test_safe_load_only(tmp_path):
    err = error(tmp_path, GOOD.replace("idea: A toy.", "idea: !!python/object/apply:os.system [ls]"))
    assert "not valid YAML" in str(err)


def test_id_without_file_and_file_without_id(tmp_path):
    err = error(tmp_path, GOOD, files=())
    assert err.line == 1 and "no entry file" in str(err) and "toy_attention.py" in str(err)
    err = error(tmp_path, GOOD, files=("toy_attention", "stray_thing"))
    assert "stray_thing.py has no catalogue entry" in str(err)


def test_repository_catalogue_matches_entry_files():
    cat = load_catalog(catalog_path())
    files = {p.stem for p in ENTRIES_DIR.glob("*.py")} - {"__init__"}
    assert {e.id.replace("-", "_") for e in cat.values()} == files
    for i in cat:
        assert zoo.load(i).__module__ == cat[i].module


# --- one-line errors, with the file and line, for files that are not a catalogue (issue 18) -----

@pytest.mark.parametrize("data, line, words", [
    (GOOD.encode().replace(b"title: A Toy", b"title: A \xff\xfeToy"), 2, "not UTF-8 text: byte 0xff"),
    (GOOD.encode().replace(b"title: A Toy", b"title: A\x00Toy"), 2, "a NUL byte"),
    (GOOD.encode() + b"  extra: " + b"[" * 3000 + b"]" * 3000 + b"\n", 21, "nested too deeply"),
    (GOOD.encode() + b"  {a: 1}: 2\n", 21, "a mapping used as a key"),
    (GOOD.encode() + b"  ? [a, b]\n  : 2\n", 21, "a list used as a key"),
], ids=["non-utf8", "nul-byte", "deep-nesting", "mapping-key", "list-key"])
def test_unreadable_catalogue_gives_one_line_with_the_line(tmp_path, data, line, words):
    path, entries = write(tmp_path, "")
    path.write_bytes(data)
    with pytest.raises(CatalogError) as err:
        load_catalog(path, entries_dir=entries)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}:{line}: ") and words in message


def test_missing_catalogue_and_a_folder_are_catalogue_errors(tmp_path):
    with pytest.raises(CatalogError, match="no such file"):
        load_catalog(tmp_path / "catalog.yaml")
    with pytest.raises(CatalogError, match="is a directory"):
        load_catalog(tmp_path)


def test_check_reports_them_as_one_line(tmp_path, capsys):
    from zoo.cli import main

    (tmp_path / "bad.yaml").write_bytes(b"- id: x\n  title: \xff\n")
    for target in (tmp_path / "bad.yaml", tmp_path / "missing.yaml", tmp_path):
        assert main(["check", "--catalog", str(target)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {target}"), err


def test_ids_with_a_trailing_newline_or_too_long_are_refused(tmp_path):
    with pytest.raises(CatalogError, match="kebab-case"):
        load(tmp_path, GOOD.replace("id: toy-attention", 'id: "toy-attention\\n"'))
    long_id = "toy-" + "a" * 70
    with pytest.raises(CatalogError, match="at most 64 characters"):
        load(tmp_path, GOOD.replace("id: toy-attention", f"id: {long_id}"), files=[long_id.replace("-", "_")])
