"""Bad data stops before any training, naming the file or folder."""

import warnings

import numpy as np
import pytest
from conftest import recipe_argv, write_image_folder
from PIL import Image

from slca_peft.data.checks import check_images
from slca_peft.data.tasks import TaskSequence
from slca_peft.utils.errors import UserError


def folders(tmp_path, classes=4, train=3, test=2):
    return (write_image_folder(tmp_path / "train", classes, train, seed=1),
            write_image_folder(tmp_path / "test", classes, test, seed=2))


#: The recipe's own seed and alignment batch: these runs stop at the image checks.
FLAGS = dict(per_device_train_batch_size=4, ca_batch_size=None, report_to=None, seed=None)


def test_a_truncated_jpeg_is_named_before_training(recipe, tmp_path, base_model_dir):
    train_dir, test_dir = folders(tmp_path)
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 255, (64, 64, 3)).astype(np.uint8)).save(train_dir / "class_03" / "cut.jpg")
    data = (train_dir / "class_03" / "cut.jpg").read_bytes()
    (train_dir / "class_03" / "cut.jpg").write_bytes(data[: len(data) // 2])
    with Image.open(train_dir / "class_03" / "cut.jpg") as img:
        img.verify()  # what the old check did: it passes
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"unreadable image .*class_03/cut\.jpg \(image file is truncated"):
        recipe.main(recipe_argv(base_model_dir, (train_dir, test_dir), out, **FLAGS))
    assert not list(out.glob("task_*"))


def test_a_task_without_test_images_is_refused_before_training(recipe, tmp_path, base_model_dir):
    train_dir, test_dir = folders(tmp_path)
    for name in ("class_02", "class_03"):  # classes 2 and 3 are one task in some class order
        for path in (test_dir / name).iterdir():
            path.unlink()
        (test_dir / name).rmdir()
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"task\(s\) \[\d\] have no test images"):
        recipe.main(recipe_argv(base_model_dir, (train_dir, test_dir), out, **FLAGS) + ["--class_order_seed", "0"])
    assert not list(out.glob("task_*"))


def test_a_metadata_csv_that_would_relabel_images_is_refused(tmp_path):
    train_dir, test_dir = folders(tmp_path)
    rows = ["file_name,label"] + [f"class_00/{i}.png,class_01" for i in range(3)]
    (train_dir / "metadata.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(UserError, match=r"metadata\.csv would relabel images"):
        TaskSequence.from_image_folders(train_dir, test_dir, init_cls=2, increment=2)


def test_folder_layout_junk_empty_classes_and_any_class_name(tmp_path):
    train_dir, test_dir = folders(tmp_path)
    for junk in (".DS_Store", "README.txt", "Thumbs.db"):
        (train_dir / "class_00" / junk).write_bytes(b"junk")
    with pytest.warns(UserWarning, match=r"skipped 3 file\(s\) that are not images"):
        seq = TaskSequence.from_image_folders(train_dir, test_dir, init_cls=2, increment=2)
    assert len(seq.train) == 12
    # Folders named like splits are ordinary class names.
    for root in (train_dir, test_dir):
        (root / "class_00").rename(root / "train")
        (root / "class_01").rename(root / "test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seq = TaskSequence.from_image_folders(train_dir, test_dir, init_cls=2, increment=2)
    assert {"train", "test"} <= set(seq.label_names) and len(seq.train) == 12 and len(seq.test) == 8
    (train_dir / "empty").mkdir()
    with pytest.raises(UserError, match=r"class folder\(s\) \['empty'\] .* hold no image"):
        TaskSequence.from_image_folders(train_dir, test_dir, init_cls=2, increment=2)


def test_images_that_cannot_be_converted_faithfully_or_bombs_are_named(tmp_path, monkeypatch):
    float_tiff = tmp_path / "float.tif"
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), mode="F").save(float_tiff)
    wide = tmp_path / "wide.tif"
    Image.fromarray((np.arange(64, dtype=np.int32) * 100000).reshape(8, 8), mode="I").save(wide)
    sixteen = tmp_path / "sixteen.png"
    Image.fromarray((np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)).save(sixteen)
    check_images([str(sixteen)])  # 16-bit PNG (opens as "I"): converted exactly by the transforms
    with pytest.raises(UserError, match=r"float\.tif: mode 'F'"):
        check_images([str(float_tiff)])
    with pytest.raises(UserError, match=r"wide\.tif: 32-bit image with values"):
        check_images([str(wide)])
    big = tmp_path / "bomb.png"
    Image.new("L", (64, 64)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(UserError, match=r"bomb\.png: decompression bomb") as err:
        check_images([str(big)])
    assert "\n" not in str(err.value)


def test_a_class_without_test_images_is_warned_about(recipe, tmp_path):
    from slca_peft.data.checks import check_task_splits

    train_dir, test_dir = folders(tmp_path)
    for path in (test_dir / "class_01").iterdir():
        path.unlink()
    (test_dir / "class_01").rmdir()
    seq = TaskSequence.from_image_folders(train_dir, test_dir, init_cls=2, increment=2, seed=None)
    with pytest.warns(UserWarning, match=r"class\(es\) \['class_01'\] have no test image"):
        check_task_splits(seq)
    # The stream keeps the class: it is learned from its training images, the task is scored on the other one.
    assert seq.label_names == ["class_00", "class_01", "class_02", "class_03"] and seq.task_sizes == [2, 2]
    assert sorted(seq[0].train[seq.label_column]) == [0, 0, 0, 1, 1, 1]
    assert seq[0].test[seq.label_column] == [0, 0]


def test_unchanged_images_are_decoded_once_per_process_changed_ones_again(tmp_path, monkeypatch):
    import io
    import os

    from slca_peft.data import checks as data_checks

    data_checks.forget_content_digests()
    folder = write_image_folder(tmp_path / "imgs", 2, 3)
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    embedded = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(embedded, format="PNG")
    sources = [*paths, embedded.getvalue()]
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k))
    check_images(sources)
    assert len(opened) == len(sources)
    check_images(sources)  # the next class-order seed of a --seeds run: nothing to decode again
    assert len(opened) == len(sources)
    broken = paths[0]
    data = open(broken, "rb").read()
    before = os.stat(broken)
    with open(broken, "wb") as fh:  # same file, same size, zeroed, its times put back
        fh.write(bytes(len(data)))
    os.utime(broken, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(broken).st_size == before.st_size and os.stat(broken).st_mtime_ns == before.st_mtime_ns
    with pytest.raises(UserError, match=r"unreadable image .*\.png"):
        check_images(sources)
    assert len(opened) == len(sources) + 1  # only the changed file was decoded again


def test_the_digest_set_holds_every_digest_it_was_given_through_its_merges(monkeypatch):
    import hashlib

    from slca_peft.data.checks import DigestSet

    monkeypatch.setattr(DigestSet, "MERGE_EVERY", 7)
    digests = [hashlib.sha256(str(i).encode()).digest() for i in range(50)]
    digests += [b"\0" * 32, b"\1" + b"\0" * 31, digests[3][:31] + b"\0"]  # trailing zero bytes are part of it
    held = DigestSet(np.array(digests[:10], dtype="S32"))
    for digest in digests[10:]:
        held.add(digest)
    assert all(d in held for d in digests) and len(held) == len(set(digests))
    assert digests[3][:31] + b"\1" not in held and b"\0" * 31 + b"\1" not in held
    assert sorted(held.array().tolist()) == held.array().tolist() and held.array().view(np.uint8).size == 32 * len(held)
    held.update(np.array(digests[:5], dtype="S32"))
    assert len(held) == len(set(digests))


def test_check_images_reads_a_generator_a_window_at_a_time(tmp_path, monkeypatch):
    from slca_peft.data import checks as data_checks

    folder = write_image_folder(tmp_path / "imgs", 2, 6)
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    monkeypatch.setattr(data_checks, "CHECK_WINDOW", 4)
    pulled, ahead = [], []
    real_decode = data_checks._decode
    monkeypatch.setattr(data_checks, "_decode", lambda s: ahead.append(len(pulled) - len(ahead)) or real_decode(s))

    def sources():
        for path in paths:
            pulled.append(path)
            yield path

    check_images(sources(), total=len(paths), workers=1)
    assert len(ahead) == len(paths) and max(ahead) <= 4  # never more than a window read ahead of the decode
    bad = tmp_path / "imgs" / "class_00" / "zz.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"unreadable image .*zz\.png.* \(and 1 more file\(s\)\)"):
        check_images(iter([*paths, str(bad), str(bad)]), workers=1)


def test_a_decoded_record_spares_a_later_run_the_decode_of_the_same_bytes_only(tmp_path, monkeypatch):
    from slca_peft.artifacts.safetensors_header import read_header
    from slca_peft.data import checks as data_checks

    folder = write_image_folder(tmp_path / "imgs", 2, 3)
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    record = tmp_path / "decoded.safetensors"
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k))
    try:
        data_checks.forget_content_digests()
        assert data_checks.use_decoded_record(record) == 0  # none yet
        check_images(paths)
        assert len(opened) == len(paths) and record.is_file()
        data_checks.forget_content_digests()  # a new process
        assert data_checks.use_decoded_record(record) == len(paths)
        check_images(paths)
        assert len(opened) == len(paths)  # hashed again, decoded never
        # Changed bytes are not vouched for: a file zeroed in place is decoded, and refused.
        data = open(paths[0], "rb").read()
        with open(paths[0], "wb") as fh:
            fh.write(bytes(len(data)))
        data_checks.forget_content_digests()
        data_checks.use_decoded_record(record)
        with pytest.raises(UserError, match=r"unreadable image .*0\.png"):
            check_images(paths)
        assert len(opened) == len(paths) + 1
        # A record from another Pillow is not trusted: everything is decoded again.
        from safetensors.numpy import load_file, save_file

        _, metadata = read_header(record)
        save_file(load_file(str(record)), str(record), metadata={**metadata, "pillow": "0.0"})
        data_checks.forget_content_digests()
        assert data_checks.use_decoded_record(record) == 0
        check_images(paths[1:])
        assert len(opened) == len(paths) + len(paths)
        # A file that is not a record is refused, named, and left as it was.
        other = tmp_path / "notes.safetensors"
        other.write_text("my notes")
        with pytest.raises(UserError, match=r"notes\.safetensors is not a decoded-images record.*--image_check_record"):
            data_checks.use_decoded_record(other)
        assert other.read_text() == "my notes"
    finally:
        data_checks.use_decoded_record(None)
        data_checks.forget_content_digests()


def test_the_recipe_keeps_what_decoded_in_its_image_check_record(recipe, tmp_path, base_model_dir):
    from slca_peft.data import checks as data_checks

    train_dir, test_dir = folders(tmp_path)
    (train_dir / "class_03" / "cut.png").write_bytes((train_dir / "class_03" / "0.png").read_bytes()[:40])
    record = tmp_path / "decoded.safetensors"
    data_checks.forget_content_digests()
    try:
        with pytest.raises(UserError, match=r"unreadable image .*class_03/cut\.png"):
            recipe.main(recipe_argv(base_model_dir, (train_dir, test_dir), tmp_path / "out", **FLAGS)
                        + ["--image_check_record", str(record)])
        # The 12 training images that decoded are recorded, the broken one is not.
        assert len(data_checks.read_decoded_record(record)) == 12
    finally:
        data_checks.use_decoded_record(None)
        data_checks.forget_content_digests()
