"""Every row of the bad-input table in docs/errors.md, run for real.

The table is parsed from the document, so the two cannot drift: a row without a case here fails
``test_every_row_has_a_case`` (and a case without a row fails it too), and each row's test checks
the error class and every fragment the row quotes in its "message contains" column. Rows entering
through the CLI also check exit code 2 and one ``error:`` line on stderr; rows sent straight to a
Triton server send each request over HTTP and gRPC and then check that the server still answers a
good request.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from posterrt.runtime.bundle import MANIFEST, Bundle
from posterrt.runtime.errors import PosterRTError

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
SECTION = "## Bad input"


@dataclass(frozen=True)
class Row:
    id: str
    where: str
    case: str
    error: str  # exception class name, or "none" for input that is accepted
    fragments: tuple[str, ...]  # the backticked pieces of the "message contains" column


def read_rows(text: str) -> list[Row]:
    """The table rows under the ``## Bad input`` heading (up to the next ``## `` heading)."""
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) != 5 or not cells[0].startswith("`"):
            continue  # header, separator, prose
        rows.append(Row(cells[0].strip("`"), cells[1], cells[2], cells[3].strip("`"),
                        tuple(re.findall(r"`([^`]+)`", cells[4]))))
    return rows


ROWS = read_rows(DOC.read_text(encoding="utf-8"))
CASES = {}


def case(row_id: str):
    def register(function):
        assert row_id not in CASES, f"two cases for {row_id}"
        CASES[row_id] = function
        return function
    return register


@dataclass
class Outcome:
    error: str  # class name, "none" when nothing was raised
    message: str


def outcome_of(call) -> Outcome:
    try:
        call()
    except Exception as error:  # the class is what the table checks
        return Outcome(type(error).__name__, str(error))
    return Outcome("none", "")


# ---------------------------------------------------------------------------------------------
# Fixtures: input files, a small bundle to break, a server
# ---------------------------------------------------------------------------------------------
def _png_with_size(width: int, height: int) -> bytes:
    """A PNG header declaring ``width`` x ``height`` (Pillow cannot write an empty image itself)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad_inputs")
    rgba = np.zeros((96, 128, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[20:80, 70:110, 3] = 255
    Image.fromarray(rgba, "RGBA").save(folder / "product.png")
    Image.fromarray(rgba[..., :3]).save(folder / "opaque.jpg")
    Image.fromarray(np.zeros((96, 128, 4), np.uint8), "RGBA").save(folder / "transparent.png")
    (folder / "a_folder.png").mkdir()
    noise = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "full.png")
    data = (folder / "full.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "zero.png").write_bytes(_png_with_size(0, 0))
    (folder / "notes.png").write_text("this is not an image")
    Image.new("L", (4097, 4096)).save(folder / "huge.png")
    frames = [Image.new("RGBA", (64, 64), (40 * i, 0, 0, 255)) for i in range(3)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(np.full((96, 128), 40000, np.uint16)).save(folder / "deep.png")  # 16-bit greyscale
    Image.fromarray(np.ones((96, 128), np.float32)).save(folder / "float.tiff")
    Image.fromarray(np.full((50, 50), 255, np.uint8)).save(folder / "small_mask.png")
    Image.fromarray(np.zeros((96, 128), np.uint8)).save(folder / "empty_mask.png")
    Image.fromarray(np.full((96, 128), 255, np.uint8)).save(folder / "full_mask.png")
    empty_bundle = folder / "empty_bundle"  # validation happens before any model loads
    empty_bundle.mkdir()
    (empty_bundle / MANIFEST).write_text(json.dumps({"format": "posterrt-bundle", "contract_version": 1,
                                                     "preset": "tiny", "models": {}, "config": {}, "assets": {}}))
    return folder


@pytest.fixture(scope="module")
def bundle_dir(request) -> Path:
    reuse = os.environ.get("POSTERRT_TEST_BUNDLE")
    return Path(reuse) if reuse else request.getfixturevalue("tiny_bundle")


@dataclass
class Context:
    files: Path
    bundle_dir: Path
    tmp: Path
    request: pytest.FixtureRequest
    capsys: pytest.CaptureFixture
    monkeypatch: pytest.MonkeyPatch

    def server(self):
        return self.request.getfixturevalue("server")

    def small_bundle(self, name: str, models=("plannet_denoiser",)) -> Path:
        """A copy of the tiny bundle with ``models`` only (plus manifest and tokenizers), to break."""
        source = Bundle(self.bundle_dir)
        out = self.tmp / name
        shutil.copytree(self.bundle_dir / "tokenizers", out / "tokenizers")
        manifest = json.loads((self.bundle_dir / MANIFEST).read_text())
        manifest["models"] = {m: manifest["models"][m] for m in models}
        for model in models:
            shutil.copy2(source.model_path(model), out / source.models[model].file)
        (out / MANIFEST).write_text(json.dumps(manifest))
        return out

    def edit_manifest(self, folder: Path, change) -> Path:
        manifest = json.loads((folder / MANIFEST).read_text())
        change(manifest)
        (folder / MANIFEST).write_text(json.dumps(manifest))
        return folder


@pytest.fixture
def ctx(files, bundle_dir, tmp_path, request, capsys, monkeypatch) -> Context:
    return Context(files, bundle_dir, tmp_path, request, capsys, monkeypatch)


@pytest.fixture(scope="module")
def repo(bundle_dir, tmp_path_factory) -> Path:
    from posterrt.runtime.triton.repository import build_repository

    out = tmp_path_factory.mktemp("repo") / "model_repository"
    build_repository(Bundle(bundle_dir), out, models=["plannet_denoiser", "plannet_encoder"])
    return out


@pytest.fixture(scope="module")
def server(repo):
    from helpers_triton import start_server

    server = start_server(repo)
    yield server
    server.stop()


# ---------------------------------------------------------------------------------------------
# The table itself
# ---------------------------------------------------------------------------------------------
def test_the_table_has_rows_with_unique_ids():
    ids = [row.id for row in ROWS]
    assert len(ids) >= 50, f"only {len(ids)} rows parsed from {DOC}"
    assert len(set(ids)) == len(ids), [i for i in ids if ids.count(i) > 1]
    for row in ROWS:
        assert row.error == "none" or row.fragments, f"{row.id}: an error row quotes what its message contains"


def test_every_row_has_a_case():
    assert sorted(set(CASES) - {r.id for r in ROWS}) == [], "cases without a row in docs/errors.md"
    assert sorted({r.id for r in ROWS} - set(CASES)) == [], "rows of docs/errors.md without a case"


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_row(row: Row, ctx):
    outcomes = CASES[row.id](ctx)
    outcomes = outcomes if isinstance(outcomes, list) else [outcomes]
    for outcome in outcomes:
        assert outcome.error == row.error, f"{row.id}: raised {outcome.error}: {outcome.message}"
        assert "\n" not in outcome.message.strip(), f"{row.id}: the message is not one line: {outcome.message!r}"
        for fragment in row.fragments:
            assert fragment in outcome.message, f"{row.id}: {fragment!r} not in {outcome.message!r}"


# ---------------------------------------------------------------------------------------------
# CLI arguments and files (posterrt generate): exit 2, one line, the class seen through a spy
# ---------------------------------------------------------------------------------------------
def cli(ctx: Context, *extra, product="product.png", out="poster.png") -> Outcome:
    from posterrt.runtime.cli import main
    from posterrt.runtime.commands import generate

    seen = {}
    real_run = generate.run

    def spy(args):
        try:
            return real_run(args)
        except PosterRTError as error:
            seen["class"] = type(error).__name__
            raise

    ctx.monkeypatch.setattr(generate, "run", spy)
    argv = ["generate", "--product", str(ctx.files / product), "--text", "Fresh juice", "--quiet",
            "--bundle", str(ctx.files / "empty_bundle"), "--out", str(ctx.tmp / out),
            *[str(a).format(files=ctx.files) for a in extra]]
    code = main(argv)
    err = ctx.capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert not (ctx.tmp / out).exists()
    return Outcome(seen.get("class", "?"), lines[0][len("error: "):])


CLI_ARGUMENTS = {
    "cli-timeout-not-positive": ["--timeout", "0"],
    "cli-steps-range": ["--steps", "0"],
    "cli-steps-not-a-number": ["--steps", "many"],
    "cli-layout-steps-range": ["--layout-steps", "201"],
    "cli-guidance-range": ["--guidance", "31"],
    "cli-guidance-nan": ["--guidance", "nan"],
    "cli-seed-negative": ["--seed", "-3"],
    "cli-size-format": ["--size", "512"],
    "cli-size-multiple": ["--size", "500x512"],
    "cli-size-range": ["--size", "2048x512"],
    "cli-scheduler": ["--scheduler", "plms"],
    "cli-threads": ["--threads", "0"],
    "cli-backend-url": ["--backend", "ftp://host:1"],
    "cli-threads-with-backend": ["--backend", "grpc://127.0.0.1:1", "--threads", "2"],
    "cli-category-blank": ["--category", " "],
    "cli-category-control": ["--category", "shoes\x1b[31m"],
    "cli-category-long": ["--category", "x" * 61],
}
for _row_id, _arguments in CLI_ARGUMENTS.items():
    case(_row_id)(lambda ctx, _arguments=_arguments: cli(ctx, *_arguments))


@case("cli-out-not-png")
def _(ctx):
    return cli(ctx, out="poster.jpg")


@case("cli-bundle-is-a-file")
def _(ctx):
    return cli(ctx, "--bundle", "{files}/notes.png")


@case("cli-out-deep")
def _(ctx):
    outcome = cli(ctx, out="missing/deeper/poster.png")
    assert not (ctx.tmp / "missing").exists()  # nothing created on the way
    return outcome


@case("cli-bundle-missing")
def _(ctx):
    return cli(ctx, "--bundle", ctx.tmp / "no_such_bundle")


PRODUCT_FILES = {
    "image-missing": "missing.png", "image-not-an-image": "notes.png", "image-empty-file": "empty.png",
    "image-zero-size": "zero.png", "image-truncated": "truncated.png", "image-huge": "huge.png",
    "image-animated": "animated.gif", "image-16-bit": "deep.png", "image-float": "float.tiff",
    "image-no-cutout": "opaque.jpg", "image-folder": "a_folder.png", "image-alpha-empty": "transparent.png",
}
for _row_id, _product in PRODUCT_FILES.items():
    case(_row_id)(lambda ctx, _product=_product: cli(ctx, product=_product))


@case("style-truncated")
def _(ctx):
    return cli(ctx, "--style", "{files}/truncated.png")


@case("logo-animated")
def _(ctx):
    return cli(ctx, "--logo", "{files}/animated.gif")


@case("mask-size")
def _(ctx):
    return cli(ctx, "--mask", "{files}/small_mask.png")


@case("mask-no-product")
def _(ctx):
    return cli(ctx, "--mask", "{files}/empty_mask.png")


@case("mask-all-product")
def _(ctx):
    return cli(ctx, "--mask", "{files}/full_mask.png")


@case("text-empty")
def _(ctx):
    return cli(ctx, "--text", "   ")


@case("text-too-many")
def _(ctx):
    return cli(ctx, *["--text", "x"] * 20)


@case("text-too-long")
def _(ctx):
    return cli(ctx, "--text", "word " * 50)


@case("text-control")
def _(ctx):
    return cli(ctx, "--text", "Sale\x07 today")


@case("text-lone-surrogate")
def _(ctx):
    from posterrt.runtime.images import check_texts

    return outcome_of(lambda: check_texts(["Sale \ud800"]))


@case("text-whitespace")
def _(ctx):
    from posterrt.runtime.images import check_texts

    texts = check_texts(["  Fresh\tjuice\n50%  off "])
    assert texts == ["Fresh juice 50% off"]
    return Outcome("none", "")


@case("text-mixed-scripts")
def _(ctx):
    """Latin, CJK, Arabic, Cyrillic and an emoji in one line: accepted, tokenized and drawn."""
    from posterrt.runtime.client import PosterClient
    from posterrt.runtime.images import check_texts

    line = "限时特惠 Sale -50% скидка تخفيض 🎉"
    assert check_texts([line]) == [line]
    product = np.full((96, 128, 3), 200, np.uint8)
    with PosterClient(ctx.bundle_dir, intra_op_threads=1) as client:
        result = client.generate(product=product, texts=[line, "New"], size=(256, 256), pipeline="layout")
    placed = [e.text for e in result.elements if e.text] + result.unplaced_texts
    assert sorted(placed) == sorted([line, "New"])
    json.dumps(result.layout_json(), ensure_ascii=False)  # the poster.json can hold it
    return Outcome("none", "")


# ---------------------------------------------------------------------------------------------
# The Python API (PosterRequest): arrays instead of files
# ---------------------------------------------------------------------------------------------
def request_outcome(**fields) -> Outcome:
    from posterrt.runtime.pipelines.request import PosterRequest

    base = {"product": np.full((96, 128, 3), 200, np.uint8), "texts": ["Sale"]}
    return outcome_of(lambda: PosterRequest(**{**base, **fields}).validate())


API_FIELDS = {
    "api-product-dtype": lambda: {"product": np.zeros((96, 128, 3), np.float32)},
    "api-product-empty": lambda: {"product": np.zeros((0, 128, 3), np.uint8)},
    "api-product-huge": lambda: {"product": np.zeros((4097, 4096, 3), np.uint8)},
    "api-mask-shape": lambda: {"product_mask": np.zeros((50, 50), np.float32)},
    "api-mask-range": lambda: {"product_mask": np.full((96, 128), 255, np.float32)},
    "api-mask-nan": lambda: {"product_mask": np.full((96, 128), np.nan, np.float32)},
    "api-mask-dtype": lambda: {"product_mask": np.zeros((96, 128), np.uint8)},
    "api-logo-channels": lambda: {"logo": np.zeros((32, 32, 3), np.uint8)},
    "api-texts-string": lambda: {"texts": "Summer sale"},
    "api-size-type": lambda: {"size": "512x512"},
    "api-guidance-type": lambda: {"guidance": "7.5"},
    "api-seed-type": lambda: {"seed": 1.5},
    "api-refine-type": lambda: {"refine": "no"},  # a truthy string would silently mean refine=True
}
for _row_id, _fields in API_FIELDS.items():
    case(_row_id)(lambda ctx, _fields=_fields: request_outcome(**_fields()))


# ---------------------------------------------------------------------------------------------
# Bundle folders
# ---------------------------------------------------------------------------------------------
def load_model(folder: Path, model="plannet_denoiser") -> Outcome:
    """What every backend does first: open the bundle, then the model's file (hash-checked)."""
    return outcome_of(lambda: Bundle(folder).model_path(model))


@case("bundle-no-folder")
def _(ctx):
    return load_model(ctx.tmp / "nowhere")


@case("bundle-no-manifest")
def _(ctx):
    folder = ctx.small_bundle("b")
    (folder / MANIFEST).unlink()
    return load_model(folder)


@case("bundle-manifest-not-json")
def _(ctx):
    folder = ctx.small_bundle("b")
    (folder / MANIFEST).write_text('{"format": "posterrt-bundle", ')  # cut short
    return load_model(folder)


@case("bundle-other-format")
def _(ctx):
    return load_model(ctx.edit_manifest(ctx.small_bundle("b"), lambda m: m.update(format="something-else")))


@case("bundle-other-contract-version")
def _(ctx):
    return load_model(ctx.edit_manifest(ctx.small_bundle("b"), lambda m: m.update(contract_version=99)))


@case("bundle-model-not-exported")
def _(ctx):
    return load_model(ctx.small_bundle("b"), model="radm_head")


@case("bundle-model-file-missing")
def _(ctx):
    folder = ctx.small_bundle("b")
    (folder / "plannet_denoiser.onnx").unlink()
    return load_model(folder)


@case("bundle-onnx-edited")
def _(ctx):
    folder = ctx.small_bundle("b")
    path = folder / "plannet_denoiser.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights
    path.write_bytes(bytes(data))
    return load_model(folder)


@case("bundle-onnx-truncated")
def _(ctx):
    folder = ctx.small_bundle("b")
    path = folder / "plannet_denoiser.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    return load_model(folder)


def _external_data_bundle(ctx) -> Path:
    """The denoiser saved with its weights in ``plannet_denoiser.onnx.data`` (as models past 2 GB are)."""
    import onnx

    from posterrt.runtime.bundle import sha256_file

    folder = ctx.small_bundle("b")
    path = folder / "plannet_denoiser.onnx"
    onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="plannet_denoiser.onnx.data", size_threshold=0)

    def record(manifest):
        entry = manifest["models"]["plannet_denoiser"]
        entry.update(sha256=sha256_file(path), data_files=["plannet_denoiser.onnx.data"],
                     data_sha256={"plannet_denoiser.onnx.data": sha256_file(folder / "plannet_denoiser.onnx.data")})

    ctx.edit_manifest(folder, record)
    assert load_model(folder).error == "none"
    return folder


@case("bundle-weights-edited")
def _(ctx):
    folder = _external_data_bundle(ctx)
    data = folder / "plannet_denoiser.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[-3] ^= 0xFF
    data.write_bytes(bytes(raw))
    return load_model(folder)


@case("bundle-weights-missing")
def _(ctx):
    folder = _external_data_bundle(ctx)
    (folder / "plannet_denoiser.onnx.data").unlink()
    return load_model(folder)


def _tokenizer_outcome(folder: Path) -> Outcome:
    from posterrt.runtime.text import load_tokenizer

    bundle = Bundle(folder)
    asset = next(key for key in bundle.manifest["assets"] if "plannet" in key)
    return outcome_of(lambda: load_tokenizer(bundle, asset, 16))


@case("bundle-tokenizer-edited")
def _(ctx):
    folder = ctx.small_bundle("b")
    bundle = Bundle(folder)
    relative = next(v for k, v in bundle.manifest["assets"].items() if "plannet" in k)
    document = json.loads((folder / relative).read_text())
    document["model"]["vocab"]["sale"] = 7  # one word now encodes as another token
    (folder / relative).write_text(json.dumps(document))
    return _tokenizer_outcome(folder)


@case("bundle-tokenizer-missing")
def _(ctx):
    folder = ctx.small_bundle("b")
    shutil.rmtree(folder / "tokenizers")
    return _tokenizer_outcome(folder)


@case("bundle-path-escape")
def _(ctx):
    folder = ctx.small_bundle("b")
    shutil.copy2(folder / "plannet_denoiser.onnx", ctx.tmp / "outside.onnx")
    ctx.edit_manifest(folder, lambda m: m["models"]["plannet_denoiser"].update(file="../outside.onnx"))
    return load_model(folder)


@case("bundle-absolute-path")
def _(ctx):
    folder = ctx.small_bundle("b")
    ctx.edit_manifest(folder, lambda m: m["models"]["plannet_denoiser"].update(file="/etc/passwd"))
    return load_model(folder)


@case("bundle-symlink-out")
def _(ctx):
    folder = ctx.small_bundle("b")
    outside = ctx.tmp / "outside.onnx"
    shutil.move(folder / "plannet_denoiser.onnx", outside)
    (folder / "plannet_denoiser.onnx").symlink_to(outside)  # same bytes, same hash: only the place is wrong
    return load_model(folder)


@case("bundle-asset-escape")
def _(ctx):
    folder = ctx.small_bundle("b")
    key = next(k for k in json.loads((folder / MANIFEST).read_text())["assets"] if "plannet" in k)
    ctx.edit_manifest(folder, lambda m: m["assets"].update({key: "../../../../etc/hostname"}))
    return _tokenizer_outcome(folder)


# ---------------------------------------------------------------------------------------------
# Tensors handed to a backend in-process (contract checks before anything runs)
# ---------------------------------------------------------------------------------------------
def backend_run(ctx, change) -> Outcome:
    from posterrt.runtime.backends.onnxruntime import OrtBackend
    from posterrt.runtime.samples import default_sizes, sample_inputs

    bundle = Bundle(ctx.bundle_dir)
    inputs = sample_inputs(bundle.contract("plannet_denoiser"), default_sizes("small"), seed=1)
    change(inputs)
    with OrtBackend(bundle, intra_op_threads=1) as backend:
        return outcome_of(lambda: backend.run("plannet_denoiser", inputs))


@case("run-wrong-dtype")
def _(ctx):
    return backend_run(ctx, lambda x: x.update(memory=x["memory"].astype(np.float64)))


@case("run-wrong-rank")
def _(ctx):
    return backend_run(ctx, lambda x: x.update(memory=x["memory"][0]))


@case("run-fixed-axis")
def _(ctx):
    return backend_run(ctx, lambda x: x.update(tokens=x["tokens"][:, :, :4]))


@case("run-axis-range")
def _(ctx):
    return backend_run(ctx, lambda x: x.update(memory=np.zeros((1, 331, x["memory"].shape[2]), np.float32),
                                               memory_mask=np.ones((1, 331), np.float32)))


@case("run-axes-disagree")
def _(ctx):
    return backend_run(ctx, lambda x: x.update(memory_mask=np.ones((1, x["memory"].shape[1] + 1), np.float32)))


@case("run-nan")
def _(ctx):
    def poison(inputs):
        inputs["memory"][0, 0, 0] = np.nan
    return backend_run(ctx, poison)


@case("run-value-range")
def _(ctx):
    return backend_run(ctx, lambda x: x.update(tokens=x["tokens"] + 100_000))


@case("run-missing-input")
def _(ctx):
    return backend_run(ctx, lambda x: x.pop("memory_mask"))


# ---------------------------------------------------------------------------------------------
# Requests sent straight to a Triton server (not through posterrt's client)
# ---------------------------------------------------------------------------------------------
WIRE = {np.dtype("float32"): "FP32", np.dtype("int64"): "INT64", np.dtype("float64"): "FP64",
        np.dtype("int32"): "INT32"}


def good_denoiser_inputs(ctx) -> dict:
    from posterrt.runtime.samples import default_sizes, sample_inputs

    inputs = sample_inputs(Bundle(ctx.bundle_dir).contract("plannet_denoiser"), default_sizes("small"), seed=2)
    inputs["timestep"] = inputs["timestep"].reshape(-1, 1)  # the wire form of a [batch] tensor
    return inputs


def raw(ctx, arrays: dict, model="plannet_denoiser", declared_shapes: dict | None = None) -> list[Outcome]:
    """Send ``arrays`` over HTTP and gRPC with tritonclient alone; after each refusal the server
    must still answer a good request."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    server = ctx.server()
    outcomes = []
    for module, url in ((httpclient, server.http_url), (grpcclient, server.grpc_url)):
        client = module.InferenceServerClient(url.split("://")[1])
        try:
            def send(tensors, shapes=None, model=model):
                items = []
                for name, array in tensors.items():
                    item = module.InferInput(name, list(array.shape), WIRE[array.dtype])
                    item.set_data_from_numpy(array)
                    if shapes and name in shapes:
                        item.set_shape(shapes[name])  # declare a shape the data does not have
                    items.append(item)
                return client.infer(model, items)

            outcomes.append(outcome_of(lambda: send(arrays, declared_shapes)))
            answer = send(good_denoiser_inputs(ctx), model="plannet_denoiser")
            assert answer.as_numpy("logits").shape[0] == 1, "the server stopped serving after a bad request"
        finally:
            client.close()
    return outcomes


@case("triton-wrong-rank")
def _(ctx):
    good = good_denoiser_inputs(ctx)
    return raw(ctx, {**good, "memory": good["memory"][0]})


@case("triton-fixed-axis")
def _(ctx):
    good = good_denoiser_inputs(ctx)
    return raw(ctx, {**good, "tokens": good["tokens"][:, :, :4]})


@case("triton-wrong-dtype")
def _(ctx):
    good = good_denoiser_inputs(ctx)
    return raw(ctx, {**good, "tokens": good["tokens"].astype(np.int32)})


@case("triton-nan")
def _(ctx):
    good = good_denoiser_inputs(ctx)
    memory = good["memory"].copy()
    memory[0, 0, 0] = np.nan
    return raw(ctx, {**good, "memory": memory})


@case("triton-inf")
def _(ctx):
    good = good_denoiser_inputs(ctx)
    return raw(ctx, {**good, "timestep": np.full_like(good["timestep"], np.inf)})


@case("triton-value-range")
def _(ctx):
    good = good_denoiser_inputs(ctx)
    return raw(ctx, {**good, "tokens": good["tokens"] + 100_000})


@case("triton-batch-too-big")
def _(ctx):
    good = good_denoiser_inputs(ctx)
    return raw(ctx, {name: np.repeat(array, 5, axis=0) for name, array in good.items()})


@case("triton-axis-range")
def _(ctx):
    good = good_denoiser_inputs(ctx)
    width = good["memory"].shape[2]
    return raw(ctx, {**good, "memory": np.zeros((1, 331, width), np.float32),
                     "memory_mask": np.ones((1, 331), np.float32)})


@case("triton-too-many-bytes")
def _(ctx):
    good = good_denoiser_inputs(ctx)
    tokens = 100_000  # 12.8 MB of memory for a model whose largest valid request is a few hundred KB
    return raw(ctx, {**good, "memory": np.zeros((1, tokens, good["memory"].shape[2]), np.float32),
                     "memory_mask": np.ones((1, tokens), np.float32)})


@case("triton-byte-count")
def _(ctx):
    good = good_denoiser_inputs(ctx)
    batch, tokens, width = good["memory"].shape  # a dynamic axis: only the byte count can give it away
    return raw(ctx, good, declared_shapes={"memory": [batch, tokens + 1, width]})


@case("triton-missing-input")
def _(ctx):
    good = good_denoiser_inputs(ctx)
    return raw(ctx, {k: v for k, v in good.items() if k != "memory_mask"})


@case("triton-unknown-input")
def _(ctx):
    good = good_denoiser_inputs(ctx)
    return raw(ctx, {**good, "extra": np.zeros((1, 3), np.float32)})


@case("triton-unknown-model")
def _(ctx):
    return raw(ctx, good_denoiser_inputs(ctx), model="bg_unet_v2")


@case("triton-load-model")
def _(ctx):
    """Model control mode none (the default): the repository API cannot load or unload models."""
    import tritonclient.http as httpclient

    server = ctx.server()
    client = httpclient.InferenceServerClient(server.http_url.split("://")[1])
    try:
        outcomes = [outcome_of(lambda: client.load_model("plannet_denoiser")),
                    outcome_of(lambda: client.unload_model("plannet_denoiser"))]
        assert client.is_model_ready("plannet_denoiser")
    finally:
        client.close()
    return outcomes


# ---------------------------------------------------------------------------------------------
# posterrt's Triton client
# ---------------------------------------------------------------------------------------------
@case("client-bad-url")
def _(ctx):
    from posterrt.runtime.backends.triton import TritonBackend

    return outcome_of(lambda: TritonBackend(Bundle(ctx.bundle_dir), "127.0.0.1:8001"))


@case("client-unreachable")
def _(ctx):
    from helpers_triton import free_port

    from posterrt.runtime.backends.triton import TritonBackend

    port = free_port()
    return outcome_of(lambda: TritonBackend(Bundle(ctx.bundle_dir), f"grpc://127.0.0.1:{port}", timeout_s=5))


@case("client-all-unreachable")
def _(ctx):
    return cli(ctx, "--backend", "grpc://127.0.0.1:1,http://127.0.0.1:2")


@case("client-other-weights")
def _(ctx):
    from posterrt.runtime.backends.triton import TritonBackend

    folder = ctx.edit_manifest(ctx.small_bundle("b"),
                               lambda m: m["models"]["plannet_denoiser"].update(sha256="0" * 64))
    return outcome_of(lambda: TritonBackend(Bundle(folder), ctx.server().grpc_url, models=["plannet_denoiser"]))


@case("client-model-not-served")
def _(ctx):
    from posterrt.runtime.backends.triton import TritonBackend

    return outcome_of(lambda: TritonBackend(Bundle(ctx.bundle_dir), ctx.server().http_url, models=["bg_unet"]))


# ---------------------------------------------------------------------------------------------
# Checkpoints (export side: needs torch) and engines
# ---------------------------------------------------------------------------------------------
class _RunsCode:
    """Unpickling this runs ``touch <marker>``: what a malicious .pth file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@case("checkpoint-pickled-code")
def _(ctx):
    torch = pytest.importorskip("torch")
    from posterrt.export.checkpoints import read_state_dict

    marker = ctx.tmp / "code_ran"
    torch.save({"weight": _RunsCode(marker)}, ctx.tmp / "evil.pth")
    outcome = outcome_of(lambda: read_state_dict(ctx.tmp / "evil.pth"))
    assert not marker.exists(), "loading the checkpoint executed its code"
    return outcome


@case("checkpoint-folder-pickled-code")
def _(ctx):
    """A diffusers folder (--from-pretrained vae=...) whose only weights are a pickle that runs code."""
    torch = pytest.importorskip("torch")
    from diffusers import AutoencoderKL

    from posterrt.export.networks.sd_pretrained import component_folder, load_vae

    folder = ctx.tmp / "vae"
    AutoencoderKL(block_out_channels=(8,), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)
                  ).save_pretrained(folder, safe_serialization=False)
    marker = ctx.tmp / "code_ran"
    torch.save({"weight": _RunsCode(marker)}, folder / "diffusion_pytorch_model.bin")
    outcome = outcome_of(lambda: load_vae(component_folder({"vae": str(folder)}, "vae")))
    assert not marker.exists(), "loading the folder executed its pickle"
    return outcome


@case("checkpoint-truncated")
def _(ctx):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from posterrt.export.checkpoints import read_state_dict

    path = ctx.tmp / "weights.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:200])
    return outcome_of(lambda: read_state_dict(path))


@case("checkpoint-missing")
def _(ctx):
    pytest.importorskip("torch")
    from posterrt.export.checkpoints import read_state_dict

    return outcome_of(lambda: read_state_dict(ctx.tmp / "nowhere.safetensors"))


def _engines_folder(ctx) -> Path:
    from posterrt.engines.build import plan_digest
    from posterrt.engines.manifest import GpuInfo, engine_entry, update_entry

    folder = ctx.tmp / "engines"
    folder.mkdir()
    plan = b"serialized engine"
    (folder / "plannet_denoiser.plan").write_bytes(plan)
    update_entry(folder, "plannet_denoiser", engine_entry(
        model="plannet_denoiser", plan="plannet_denoiser.plan", precision="fp16", profile={}, ranges={},
        gpu=GpuInfo("NVIDIA H100 80GB HBM3", "9.0"), tensorrt_version="10.9.0.34", source_onnx_sha256="ab" * 32,
        bundle="b", build_options={}, build_seconds=1.0, plan_sha256=plan_digest(plan)))
    return folder


@case("engine-plan-replaced")
def _(ctx):
    from posterrt.engines.manifest import GpuInfo, checked_plan

    folder = _engines_folder(ctx)
    (folder / "plannet_denoiser.plan").write_bytes(b"half a plan")
    return outcome_of(lambda: checked_plan(folder, "plannet_denoiser", GpuInfo("NVIDIA H100 80GB HBM3", "9.0"),
                                           "10.9.0.34"))


@case("engine-plan-escape")
def _(ctx):
    from posterrt.runtime.triton.model_config import ServingOptions
    from posterrt.runtime.triton.repository import build_repository

    folder = _engines_folder(ctx)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["engines"]["plannet_denoiser"]["plan"] = "../../outside.plan"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return outcome_of(lambda: build_repository(Bundle(ctx.bundle_dir), ctx.tmp / "repo", ServingOptions(flavor="gpu-trt"),
                                               models=["plannet_denoiser"], engines=folder))


# ---------------------------------------------------------------------------------------------
# posterrt eval-layout: protocols and benchmark-style batches
# ---------------------------------------------------------------------------------------------
def eval_cli(ctx: Context, *arguments) -> Outcome:
    """``posterrt eval-layout`` with ``arguments``: exit 2, one ``error:`` line, the class through a spy."""
    from posterrt.runtime.cli import main
    from posterrt.runtime.commands import eval_layout

    seen = {}
    real_run = eval_layout.run

    def spy(args):
        try:
            return real_run(args)
        except PosterRTError as error:
            seen["class"] = type(error).__name__
            raise

    ctx.monkeypatch.setattr(eval_layout, "run", spy)
    code = main(["eval-layout", *map(str, arguments), "--out", str(ctx.tmp / "report.json")])
    err = ctx.capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert not (ctx.tmp / "report.json").exists()
    return Outcome(seen.get("class", "?"), lines[0][len("error: "):])


BATCH_BOXES = np.asarray([[[0.1, 0.1, 0.5, 0.2], [0.05, 0.05, 0.6, 0.25]], [[0.2, 0.5, 0.4, 0.6], [0, 0, 0, 0]]],
                         np.float32)
BATCH_CLASSES = np.asarray([[1, 3], [2, 0]])


def _batch(ctx: Context, boxes=BATCH_BOXES, classes=BATCH_CLASSES) -> Path:
    path = ctx.tmp / "batch.npz"
    np.savez(path, boxes=boxes, classes=classes, canvas=[100, 100])
    return path


def _layout_json(ctx: Context, cls: str = "text") -> Path:
    path = ctx.tmp / "layout.json"
    path.write_text(json.dumps({"width": 100, "height": 100, "elements": [{"class": cls, "box": [0, 0, 50, 50]}]}))
    return path


@case("eval-protocol")
def _(ctx):
    return eval_cli(ctx, "--layouts", _layout_json(ctx), "--protocol", "cgl")


@case("eval-protocol-class")
def _(ctx):
    return eval_cli(ctx, "--layouts", _layout_json(ctx, "embellishment"), "--protocol", "posterlayout")


@case("eval-protocol-masks")
def _(ctx):
    return eval_cli(ctx, "--layouts", _layout_json(ctx), "--protocol", "radm", "--masks", ctx.files)


@case("eval-batch-pickle")
def _(ctx):
    (ctx.tmp / "boxes.pt").write_bytes(b"PK\x03\x04 a torch.save zip would be unpickled")
    return eval_cli(ctx, "--layouts", ctx.tmp / "boxes.pt")


@case("eval-batch-object-array")
def _(ctx):
    np.save(ctx.tmp / "boxes.npy", np.asarray([{"boxes": 1}], dtype=object), allow_pickle=True)
    return eval_cli(ctx, "--layouts", ctx.tmp / "boxes.npy", "--classes", ctx.tmp / "boxes.npy")


@case("eval-batch-class-id")
def _(ctx):
    return eval_cli(ctx, "--layouts", _batch(ctx, classes=np.asarray([[1, 7], [2, 0]])))


@case("eval-batch-box-order")
def _(ctx):
    return eval_cli(ctx, "--layouts", _batch(ctx, boxes=BATCH_BOXES[:, :, ::-1]))


@case("eval-batch-names-count")
def _(ctx):
    (ctx.tmp / "names.txt").write_text("a.png\n")
    return eval_cli(ctx, "--layouts", _batch(ctx), "--names", ctx.tmp / "names.txt")


@case("eval-batch-no-names")
def _(ctx):
    return eval_cli(ctx, "--layouts", _batch(ctx), "--images", ctx.files)


@case("eval-batch-flag-on-json")
def _(ctx):
    return eval_cli(ctx, "--layouts", _layout_json(ctx), "--canvas", "100x100")


@case("eval-class-map")
def _(ctx):
    return eval_cli(ctx, "--layouts", _batch(ctx), "--class-map", "1=banner")


@case("eval-canvas")
def _(ctx):
    return eval_cli(ctx, "--layouts", _batch(ctx), "--canvas", "513")


@case("eval-coco-image-id")
def _(ctx):
    (ctx.tmp / "results.json").write_text(json.dumps([{"image_id": 3, "bbox": [0, 0, 5, 5], "category_id": 1}]))
    (ctx.tmp / "names.txt").write_text("a.png\nb.png\n")
    return eval_cli(ctx, "--layouts", ctx.tmp / "results.json", "--names", ctx.tmp / "names.txt", "--canvas", "10x10")


# ---------------------------------------------------------------------------------------------
# What a server lets in by default
# ---------------------------------------------------------------------------------------------
def test_server_binds_loopback_and_refuses_model_control(server):
    import argparse
    import inspect
    import ipaddress

    import psutil

    from posterrt.runtime.commands import serve
    from posterrt.runtime.triton.server import TritonServer

    listening = [c.laddr for c in psutil.Process(server.process.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert sorted(a.port for a in listening) == sorted(server.ports.values()), listening
    for address in listening:  # gRPC listens on the IPv4-mapped form ::ffff:127.0.0.1
        ip = ipaddress.ip_address(address.ip)
        ip = getattr(ip, "ipv4_mapped", None) or ip
        assert ip == ipaddress.ip_address("127.0.0.1"), f"a socket listens beyond loopback: {listening}"
    assert "--model-control-mode=none" in server.process.args
    # the defaults a user gets without asking: the class and the command
    parameters = inspect.signature(TritonServer).parameters
    assert parameters["host"].default == "127.0.0.1" and parameters["model_control"].default == "none"
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    defaults = parser.parse_args([])
    assert defaults.host == "127.0.0.1" and defaults.model_control == "none"


# ---------------------------------------------------------------------------------------------
# Progress, cancellation and deadlines through the Python API (runtime/progress.py)
# ---------------------------------------------------------------------------------------------
def _layout_fields() -> dict:
    return dict(product=np.full((64, 48, 3), 120, np.uint8), texts=["Sale"], size=(256, 256), layout_steps=2)


@case("api-timeout-not-positive")
def _(ctx):
    from posterrt.runtime.client import PosterClient

    with PosterClient(ctx.bundle_dir, intra_op_threads=1) as client:
        return [outcome_of(lambda: client.generate(pipeline="layout", timeout=-1, **_layout_fields())),
                outcome_of(lambda: client.submit(pipeline="layout", timeout=-1, **_layout_fields()))]


@case("api-cancel-finished")
def _(ctx):
    from posterrt.runtime.client import PosterClient

    with PosterClient(ctx.bundle_dir, intra_op_threads=1) as client:
        job = client.submit(pipeline="layout", **_layout_fields())
        result = job.result(timeout=120)
        assert job.cancel() is False and client.cancel(job) is False and job.result() is result
        return outcome_of(job.result)


@case("api-progress-raises")
def _(ctx):
    from posterrt.runtime.client import PosterClient

    def broken(event):
        raise ValueError("display went away")

    with PosterClient(ctx.bundle_dir, intra_op_threads=1) as client:
        return outcome_of(lambda: client.generate(pipeline="layout", progress=broken, **_layout_fields()))
