#!/usr/bin/env python3
"""Writes the TFDS data-dir fixtures for the VTAB-1k `kind = "tfds"` reader (fixtures/tfds).

NOT needed in CI: CI only reads the committed output. Re-run by hand when the fixtures must change.

How to run (Python 3.11, CPU only, ~1-2 minutes):

    python3 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu==2.21.0 tensorflow-datasets==4.9.10 \
        importlib_resources   # TFDS 4.9.10 imports it but does not declare it
    # google-research/task_adaptation (TA) at d7630d3, for its split strings and label functions:
    #   copy its `task_adaptation/` package (at least __init__.py, registry.py, data/__init__.py,
    #   data/base.py, data/cifar.py, data/eurosat.py, data/clevr.py) to /tmp/ta_src/task_adaptation/
    #   -- never into this repository.
    /tmp/tfenv/bin/python tools/gen_tfds_fixtures.py [--out fixtures/tfds] \
        [--corrupt-out fixtures/tfds-corrupt] [--ta-src /tmp/ta_src]

Last run with: Python 3.11.7, tensorflow-cpu 2.21.0, tensorflow-datasets 4.9.10, numpy 2.4.6,
protobuf 7.36.2, importlib_resources 7.1.0, TA d7630d3c43ba052b5a35546b312d9454a9f2c96b
(imported, see below).

Reproducibility: the synthetic data, record order, shard lengths and expected.json are the same on
every run, except the shard bytes: the protobuf runtime serialises the tf.train.Example feature
map in an order that changes between processes (as it does for real TFDS data), so a reader must
not depend on map-entry order; and the value of the flipped byte in tfds-corrupt/crc.

What it writes
--------------
1. `<out>/` is a TFDS data dir written by the real TFDS writer (`download_and_prepare`):
     cifar100/3.0.2/            (natural task, PNG 32x32x3; `Image(shape=(32,32,3))` is kept)
     eurosat/rgb/2.0.0/         (specialized task, JPEG 64x64x3 as in EuroSAT; shape kept)
     clevr/3.1.0/               (structured tasks; RGBA PNG of varying tiny sizes; `Image()`)
   Each is produced by a subclass of the real TFDS builder (`tfds.image_classification.Cifar100`,
   `...Eurosat` with config `rgb`, `tfds.builder_cls('clevr')`) that overrides only
   `_split_generators`, pointing it at a small synthetic copy of the original download laid out
   exactly like the original archive (cifar-100-binary/*.bin, EuroSAT 2750/<class>/<class>_N.jpg,
   CLEVR_v1.0/{images,questions,scenes}); the real `_info` and `_generate_examples` run unchanged,
   so features, example keys, record shuffling and versions are the real ones. The subclasses
   keep the real builder's name, module and metadata dir, so dataset_info.json is what the real
   builder writes. Several shards per split are forced with DownloadConfig(num_shards=...).
2. `<corrupt-out>/crc/cifar100/3.0.2/` and `<corrupt-out>/truncated/cifar100/3.0.2/`: the
   cifar100 metadata plus only the `test` shards, one of which is damaged (a payload byte flipped /
   the file cut inside a record). The train shards are deliberately absent.
3. `<out>/expected.json`: for each VTAB task and split (train800, val200, train800val200, test)
   the TFDS split string, example count, ids and labels in on-disk order (shard order, then
   record order), the order TFDS actually yields them in (interleave 16x16), plus per-image
   checks of tf.image.decode_image(channels=3) output: sha256 (PNG and JPEG) and for JPEG also
   per-channel sums (for comparing another JPEG decoder with a tolerance).

Labels and split strings: computed by importing TA's own data classes
(`task_adaptation.data.{cifar,eurosat,clevr}`, TA's get_tf_data with for_eval=True), when
--ta-src holds them. They are also recomputed independently below (`ta_splits`, `label_*`,
which cite TA's files), and the two must agree or the script fails. expected.json's
`label_source` says whether TA's code was used.
"""

import argparse
import base64
import collections
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from tensorflow_datasets.image_classification import cifar as tfds_cifar  # noqa: E402
from tensorflow_datasets.image_classification import eurosat as tfds_eurosat  # noqa: E402

TA_COMMIT = "d7630d3c43ba052b5a35546b312d9454a9f2c96b"

# Split sizes: chosen so that TA's floor divisions matter and val200 ends inside the split.
CIFAR_TRAIN_N = 2011  # T = 90*2011//100 = 1809 -> val200 = train[1809:2009]
CIFAR_TEST_N = 100
EUROSAT_N = 1351  # T = 810, V = 270 -> val200 = train[810:1010], test = train[1080:] (271)
# (N must be >= 1334 so that val200 does not overlap train800, as with the real N = 27000.)
CLEVR_TRAIN_N = 2011  # T = 1809
CLEVR_VAL_N = 100  # VTAB test = TFDS validation
CLEVR_TEST_N = 12  # TFDS test (no scenes, like real CLEVR); unused by VTAB, needed by TA's code
# clevr: 11 shards put a shard boundary inside val200 = train[1809:2009]; cifar100: 4 shards
# keep val200 inside one shard (skip+take within a shard).
NUM_SHARDS = {"cifar100": 4, "eurosat": 3, "clevr": 11}

CIFAR100_FINE = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo "
    "keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse "
    "mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy "
    "porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper "
    "snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television "
    "tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm").split()
CIFAR100_COARSE = (
    "aquatic_mammals fish flowers food_containers fruit_and_vegetables "
    "household_electrical_devices household_furniture insects large_carnivores "
    "large_man-made_outdoor_things large_natural_outdoor_scenes large_omnivores_and_herbivores "
    "medium_mammals non-insect_invertebrates people reptiles small_mammals trees vehicles_1 "
    "vehicles_2").split()
assert len(CIFAR100_FINE) == 100 and len(CIFAR100_COARSE) == 20

CLEVR_COLORS = ["gray", "blue", "brown", "yellow", "red", "green", "purple", "cyan"]
CLEVR_MATERIALS = ["rubber", "metal"]
CLEVR_SHAPES = ["cube", "sphere", "cylinder"]
CLEVR_SIZES = ["small", "large"]


# --------------------------------------------------------------------------------------------
# 1. Synthetic "downloads" laid out like the original archives
# --------------------------------------------------------------------------------------------

def make_cifar_source(root, rng):
  """cifar-100-binary/{train,test}.bin: per record coarse byte, fine byte, 3072 bytes CHW."""
  d = os.path.join(root, "cifar-100-binary")
  os.makedirs(d)
  with open(os.path.join(d, "fine_label_names.txt"), "w") as f:
    f.write("\n".join(CIFAR100_FINE) + "\n")
  with open(os.path.join(d, "coarse_label_names.txt"), "w") as f:
    f.write("\n".join(CIFAR100_COARSE) + "\n")
  for fname, n in (("train.bin", CIFAR_TRAIN_N), ("test.bin", CIFAR_TEST_N)):
    with open(os.path.join(d, fname), "wb") as f:
      for _ in range(n):
        fine = int(rng.integers(0, 100))
        coarse = int(rng.integers(0, 20))
        # 2x2 blocks of 16x16 flat colour: unique per image, compresses to ~120 bytes of PNG.
        blocks = rng.integers(0, 256, (2, 2, 3), dtype=np.uint8)
        img = np.kron(blocks, np.ones((16, 16, 1), dtype=np.uint8))  # HWC 32x32x3
        f.write(bytes([coarse, fine]) + img.transpose(2, 0, 1).tobytes())
  return d


def make_eurosat_source(root, rng):
  """2750/<Class>/<Class>_<k>.jpg, 64x64 RGB baseline JPEG (4:2:0, libjpeg-turbo via TF)."""
  d = os.path.join(root, "2750")
  labels = tfds_eurosat._LABELS
  yy, xx = np.mgrid[0:64, 0:64].astype(np.float64)
  counters = collections.Counter()
  for i in range(EUROSAT_N):
    label = labels[int(rng.integers(0, len(labels)))]
    counters[label] += 1
    a = rng.uniform(-2.0, 2.0, 3)
    b = rng.uniform(-2.0, 2.0, 3)
    c = rng.uniform(40, 215, 3)
    img = c + a * (xx[..., None] - 32) + b * (yy[..., None] - 32)
    if i % 3 == 0:
      # A sharp-edged square so the IDCT / chroma upsampling see high frequencies too.
      x0, y0 = int(rng.integers(0, 56)), int(rng.integers(0, 56))
      img[y0:y0 + 8, x0:x0 + 8, :] = rng.uniform(0, 255, 3)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    jpeg = tf.io.encode_jpeg(img, quality=50, optimize_size=True).numpy()
    os.makedirs(os.path.join(d, label), exist_ok=True)
    with open(os.path.join(d, label, "%s_%d.jpg" % (label, counters[label])), "wb") as f:
      f.write(jpeg)
  return d


def make_clevr_source(root, rng):
  """CLEVR_v1.0/{images/<split>/CLEVR_<split>_NNNNNN.png, questions/, scenes/} (no test scenes)."""
  base = os.path.join(root, "CLEVR_v1.0")
  thresholds = [8.0, 8.5, 9.0, 9.5, 10.0]
  for split, n in (("train", CLEVR_TRAIN_N), ("val", CLEVR_VAL_N), ("test", CLEVR_TEST_N)):
    img_dir = os.path.join(base, "images", split)
    os.makedirs(img_dir)
    scenes, questions = [], []
    for i in range(n):
      fname = "CLEVR_%s_%06d.png" % (split, i)
      w, h = int(rng.integers(2, 7)), int(rng.integers(2, 6))
      # RGBA like real CLEVR (which is 480x320); alpha is varied here so that "drop alpha"
      # (what decode_image(channels=3) does) differs from any compositing.
      img = np.zeros((h, w, 4), dtype=np.uint8)
      img[:, :, :3] = rng.integers(0, 256, 3, dtype=np.uint8)
      img[: h // 2, :, :3] = rng.integers(0, 256, 3, dtype=np.uint8)
      img[:, :, 3] = 255
      img[h - 1, w - 1, 3] = int(rng.integers(0, 256))
      with open(os.path.join(img_dir, fname), "wb") as f:
        f.write(tf.io.encode_png(img).numpy())
      # count_all label = n_obj - 3 in 0..7; skewed to few objects to keep the fixture small.
      n_obj = 3 + int(rng.choice(8, p=[0.45, 0.2, 0.1, 0.07, 0.06, 0.05, 0.04, 0.03]))
      r = rng.random()
      if r < 0.1:
        dmin = float(thresholds[int(rng.integers(0, 5))])  # exactly on a threshold
      else:
        dmin = float(np.float32(rng.uniform(6.5, 12.5)))
      zs = [dmin] + [float(np.float32(dmin + rng.uniform(0.05, 4.0))) for _ in range(n_obj - 1)]
      rng.shuffle(zs)
      objects = []
      for z in zs:
        objects.append({
            "color": CLEVR_COLORS[int(rng.integers(0, 8))],
            "size": CLEVR_SIZES[int(rng.integers(0, 2))],
            "rotation": float(np.float32(rng.uniform(0, 360))),
            "shape": CLEVR_SHAPES[int(rng.integers(0, 3))],
            "3d_coords": [float(np.float32(v)) for v in rng.uniform(-3, 3, 3)],
            "material": CLEVR_MATERIALS[int(rng.integers(0, 2))],
            "pixel_coords": [int(rng.integers(0, 480)), int(rng.integers(0, 320)), z],
        })
      scenes.append({"image_index": i, "image_filename": fname, "split": split,
                     "objects": objects})
      if i % 10 == 0:  # a few questions only, to keep the fixture small
        questions.append({"image_filename": fname, "image_index": i,
                          "question": "How many things are there?",
                          "answer": "" if split == "test" else str(n_obj)})
    os.makedirs(os.path.join(base, "questions"), exist_ok=True)
    with open(os.path.join(base, "questions", "CLEVR_%s_questions.json" % split), "w") as f:
      json.dump({"info": {"split": split}, "questions": questions}, f)
    if split != "test":  # the real test split has no scenes file
      os.makedirs(os.path.join(base, "scenes"), exist_ok=True)
      with open(os.path.join(base, "scenes", "CLEVR_%s_scenes.json" % split), "w") as f:
        json.dump({"info": {"split": split}, "scenes": scenes}, f)
  return root


# --------------------------------------------------------------------------------------------
# 2. Builders: the real ones, with only _split_generators pointed at the synthetic source
# --------------------------------------------------------------------------------------------

SOURCE = {}  # dataset name -> synthetic source dir


class FixtureCifar100(tfds_cifar.Cifar100, skip_registration=True):
  name = "cifar100"
  __module__ = tfds_cifar.Cifar100.__module__
  pkg_dir_path = tfds_cifar.Cifar100._get_pkg_dir_path()

  def _split_generators(self, dl_manager):
    # Same as tfds Cifar10._split_generators, minus the download.
    del dl_manager
    cifar_info = self._cifar_info
    cifar_path = SOURCE["cifar100"]
    for label_key, label_file in zip(cifar_info.label_keys, cifar_info.label_files):
      with open(os.path.join(cifar_path, label_file)) as label_f:
        label_names = [name for name in label_f.read().split("\n") if name]
      self.info.features[label_key].names = label_names
    def gen_filenames(filenames):
      for f in filenames:
        yield os.path.join(cifar_path, f)
    return {
        tfds.Split.TRAIN: self._generate_examples("train_", gen_filenames(cifar_info.train_files)),
        tfds.Split.TEST: self._generate_examples("test_", gen_filenames(cifar_info.test_files)),
    }


class FixtureEurosat(tfds_eurosat.Eurosat, skip_registration=True):
  name = "eurosat"
  __module__ = tfds_eurosat.Eurosat.__module__
  pkg_dir_path = tfds_eurosat.Eurosat._get_pkg_dir_path()

  def _split_generators(self, dl_manager):
    del dl_manager
    return [tfds.core.SplitGenerator(
        name=tfds.Split.TRAIN,
        gen_kwargs={"path": SOURCE["eurosat"], "selection": self.builder_config.selection})]


_ClevrBuilder = tfds.builder_cls("clevr")


class FixtureClevr(_ClevrBuilder, skip_registration=True):
  name = "clevr"
  __module__ = _ClevrBuilder.__module__
  pkg_dir_path = _ClevrBuilder._get_pkg_dir_path()

  def _split_generators(self, dl_manager):
    del dl_manager
    path = SOURCE["clevr"]
    name_map = {"train": tfds.Split.TRAIN, "val": tfds.Split.VALIDATION, "test": tfds.Split.TEST}
    return [tfds.core.SplitGenerator(
        name=name_map[s],
        gen_kwargs={
            "images_dir_path": os.path.join(path, "CLEVR_v1.0/images", s),
            "question_file": os.path.join(path, "CLEVR_v1.0/questions",
                                          "CLEVR_{}_questions.json".format(s)),
            "scenes_description_file": os.path.join(path, "CLEVR_v1.0/scenes",
                                                    "CLEVR_{}_scenes.json".format(s)),
        }) for s in ("train", "val", "test")]


def build_all(out, tmp):
  rng = np.random.default_rng(20240611)
  SOURCE["cifar100"] = make_cifar_source(os.path.join(tmp, "cifar"), rng)
  SOURCE["eurosat"] = make_eurosat_source(os.path.join(tmp, "eurosat"), rng)
  SOURCE["clevr"] = make_clevr_source(os.path.join(tmp, "clevr"), rng)
  builders = [
      (FixtureCifar100, {"version": "3.0.2"}, "cifar100"),
      (FixtureEurosat, {"config": "rgb", "version": "2.0.0"}, "eurosat"),
      (FixtureClevr, {"version": "3.1.0"}, "clevr"),
  ]
  for cls, kwargs, name in builders:
    b = cls(data_dir=out, **kwargs)
    b.download_and_prepare(
        download_dir=os.path.join(tmp, "downloads"),
        download_config=tfds.download.DownloadConfig(
            num_shards=NUM_SHARDS[name], try_download_gcs=False,
            download_mode=tfds.download.GenerateMode.FORCE_REDOWNLOAD))


# --------------------------------------------------------------------------------------------
# 3. Reading back: on-disk order, TA splits/labels, decoded-image checks
# --------------------------------------------------------------------------------------------

DATASETS = {
    # name: (relative dir, id key, image format expected)
    "cifar100": ("cifar100/3.0.2", "id"),
    "eurosat": ("eurosat/rgb/2.0.0", "filename"),
    "clevr": ("clevr/3.1.0", "file_name"),
}
TASKS = {
    # task: (dataset, TA registry name, TA class kwargs, num_classes)
    "cifar100": ("cifar100", "cifar(num_classes=100)", ("cifar", "CifarData", {"num_classes": 100}), 100),
    "eurosat": ("eurosat", "eurosat", ("eurosat", "EurosatData", {}), 10),
    "clevr_count_all": ("clevr", 'clevr(task="count_all")',
                        ("clevr", "CLEVRData", {"task": "count_all"}), 8),
    "clevr_closest_object_distance": ("clevr", 'clevr(task="closest_object_distance")',
                                      ("clevr", "CLEVRData", {"task": "closest_object_distance"}), 6),
}
VTAB_SPLITS = ["train800", "val200", "train800val200", "test"]
LABEL_RULES = {
    "cifar100": "label = stored int64 `label` (fine label) (TA cifar.py:107)",
    "eurosat": "label = stored int64 `label` (TA eurosat.py:90-93)",
    "clevr_count_all": "label = len(objects/size) - 3 (TA clevr.py:32-34)",
    "clevr_closest_object_distance": (
        "d = min over objects of objects/pixel_coords[3i+2] (float32); thrs = [0, 8, 8.5, 9, "
        "9.5, 10, 100]; label = largest i with thrs[i] - d < 0 (TA clevr.py:45-53)"),
}


def ta_splits(task, info_splits):
  """Independent re-implementation of TA's VTAB-1k split strings (TA @ d7630d3).

  cifar:   TA data/cifar.py:28 (TRAIN_SPLIT_PERCENT=90), :64-87 (counts, tfds_splits).
  eurosat: TA data/eurosat.py:25-27 (60/20/20), :47-67.
  clevr:   TA data/clevr.py:29 (90), :90-113 ("test": "validation").
  """
  if task == "cifar100" or task.startswith("clevr"):
    t = 90 * info_splits["train"] // 100
    test = "test" if task == "cifar100" else "validation"
    return {"train800": "train[:800]", "val200": "train[%d:%d]" % (t, t + 200),
            "train800val200": "train[:800]+train[%d:%d]" % (t, t + 200), "test": test}
  if task == "eurosat":
    n = info_splits["train"]
    t, v = n * 60 // 100, n * 20 // 100
    return {"train800": "train[:800]", "val200": "train[%d:%d]" % (t, t + 200),
            "train800val200": "train[:800]+train[%d:%d]" % (t, t + 200),
            "test": "train[%d:]" % (t + v)}
  raise ValueError(task)


def feat(ex, key):
  f = ex.features.feature.get(key)
  if f is None:
    return None
  kind = f.WhichOneof("kind")
  return kind, list(getattr(f, kind).value)


def label_of(task, ex):
  """Independent re-implementation of TA's labels.

  cifar100/eurosat: the stored `label` (TA cifar.py:107, eurosat.py:90-93).
  count_all: tf.size(objects/size) - 3 (TA clevr.py:32-34).
  closest_object_distance: d = min(pixel_coords[:, 2]); thrs = [0, 8, 8.5, 9, 9.5, 10, 100];
    label = max(where(thrs - d < 0)) (TA clevr.py:45-53), computed in float32 like TF.
  """
  if task in ("cifar100", "eurosat"):
    return int(feat(ex, "label")[1][0])
  if task == "clevr_count_all":
    v = feat(ex, "objects/size")
    return len(v[1] if v else []) - 3
  if task == "clevr_closest_object_distance":
    z = np.array(feat(ex, "objects/pixel_coords")[1], dtype=np.float32)[2::3]
    d = z.min()
    thrs = np.array([0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0], dtype=np.float32)
    return int(np.max(np.nonzero((thrs - d) < 0)[0]))
  raise ValueError(task)


def sniff(b):
  if b[:3] == b"\xff\xd8\xff":
    return "jpeg"
  if b[:8] == b"\x89PNG\r\n\x1a\n":
    return "png"
  return "other"


def parse_split_string(s, lengths):
  """'train[:800]+train[1809:2009]' -> [(split, from, to)], integer bounds only."""
  out = []
  for part in s.split("+"):
    m = re.fullmatch(r"(\w+)(?:\[(-?\d*):(-?\d*)\])?", part)
    name, a, b = m.group(1), m.group(2), m.group(3)
    n = lengths[name]
    a = int(a) if a else 0
    b = int(b) if b else n
    a, b = (a + n if a < 0 else a), (b + n if b < 0 else b)
    out.append((name, max(0, min(a, n)), max(0, min(b, n))))
  return out


def read_dataset(root, rel):
  """Reads every split in shard order with plain tf.data.TFRecordDataset (CRC-checked)."""
  d = os.path.join(root, rel)
  info = json.load(open(os.path.join(d, "dataset_info.json")))
  splits = {}
  for s in info["splits"]:
    lengths = [int(x) for x in s["shardLengths"]]
    template = s.get("filepathTemplate", "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}")
    files = [template.replace("{DATASET}", info["name"]).replace("{SPLIT}", s["name"])
             .replace("{FILEFORMAT}", info.get("fileFormat", "tfrecord"))
             .replace("{SHARD_X_OF_Y}", "%05d-of-%05d" % (i, len(lengths)))
             for i in range(len(lengths))]
    recs = []
    for f, n in zip(files, lengths):
      r = list(tf.data.TFRecordDataset(os.path.join(d, f)).as_numpy_iterator())
      assert len(r) == n, (f, len(r), n)
      recs += [tf.train.Example.FromString(x) for x in r]
    splits[s["name"]] = {"info": s, "files": files, "lengths": lengths, "examples": recs}
  return info, splits


def decoded_entry(enc, fmt):
  img = tf.image.decode_image(enc, channels=3, expand_animations=False).numpy()
  e = {"shape": list(img.shape), "sha256": hashlib.sha256(img.tobytes()).hexdigest(),
       "encoded_len": len(enc)}
  if fmt == "jpeg":
    e["channel_sums"] = [int(x) for x in img.reshape(-1, 3).sum(axis=0, dtype=np.int64)]
  return e, img


def try_import_ta(ta_src):
  if not ta_src or not os.path.isdir(os.path.join(ta_src, "task_adaptation", "data")):
    return None
  sys.path.insert(0, ta_src)
  import importlib
  mods = {}
  for m in ("cifar", "eurosat", "clevr"):
    mods[m] = importlib.import_module("task_adaptation.data." + m)
  return mods


def ta_read(ta_mods, task, data_dir):
  """Runs TA's data class: split strings, counts, labels and decoded images in yield order."""
  mod, cls, kwargs = TASKS[task][2]
  data = getattr(ta_mods[mod], cls)(data_dir=data_dir, **kwargs)
  assert data._dataset_builder.info.full_name == os.path.join(*DATASETS[TASKS[task][0]][0].split("/")), \
      data._dataset_builder.info.full_name
  id_key = DATASETS[TASKS[task][0]][1]
  out = {}
  for split in VTAB_SPLITS:
    raw = data._get_dataset_split(split_name=split, shuffle_files=False)  # what TA reads
    ids = [x[id_key].decode() for x in tfds.as_numpy(raw)]
    tfd = data.get_tf_data(split, batch_size=1, drop_remainder=False, for_eval=True, epochs=1,
                           prefetch=0, shuffle_buffer_size=1)
    labels, shas = [], []
    for x in tfds.as_numpy(tfd):
      labels.append(int(x["label"][0]))
      shas.append(hashlib.sha256(np.ascontiguousarray(x["image"][0]).tobytes()).hexdigest())
    assert len(ids) == len(labels)
    out[split] = {"tfds_split": data._tfds_splits[split],
                  "num_samples": data.get_num_samples(split),
                  "num_classes": data.get_num_classes(),
                  "ids": ids, "labels": labels, "shas": shas}
  return out


def compute_expected(out_dir, ta_mods):
  exp = collections.OrderedDict()
  exp["format"] = "vqt-tfds-fixture/1"
  exp["generator"] = "tools/gen_tfds_fixtures.py"
  exp["versions"] = {"tensorflow": tf.__version__, "tensorflow_datasets": tfds.__version__,
                     "numpy": np.__version__, "python": sys.version.split()[0]}
  exp["label_source"] = ("ta: task_adaptation@%s data classes imported and run (get_tf_data, "
                         "for_eval=True); checked equal to the re-implementation in the "
                         "generator" % TA_COMMIT) if ta_mods else \
      "reimplementation in tools/gen_tfds_fixtures.py (TA not importable)"
  exp["notes"] = [
      "ids/labels: on-disk order = shards in index order, records in file order, then the "
      "slice(s) of the split string in the order written.",
      "tfds_yield_order: indices into ids, in the order tfds as_dataset(shuffle_files=False) "
      "yields them (interleave cycle 16, block 16), i.e. what TA/VPT iterate over.",
      "Decoded images: img = tf.image.decode_image(encoded, channels=3) as uint8 HWC "
      "row-major bytes (libjpeg-turbo with TF defaults for JPEG; alpha dropped for RGBA PNG). "
      "image_sha256_16[k] = first 16 hex digits of sha256(img of example k); "
      "pixels_sha256 = full sha256 over the concatenation of all imgs of the split in on-disk "
      "order; image_channel_sums[k] = per-channel sums of img (JPEG datasets only); "
      "image_shape is given once when constant, else image_shapes per example; "
      "image_encoded_len[k] = length of the stored `image` bytes.",
      "train800val200 gives no ids/labels/images: its on-disk order is train800's followed by "
      "val200's (the split string is their concatenation); tfds_yield_order indexes that "
      "concatenation.",
      "clevr_closest_object_distance shares ids and images with clevr_count_all; only its "
      "labels differ.",
      "ta_num_samples: TA's get_num_samples(split), informational only: for eurosat test it "
      "is N*20//100, not the size of the slice train[T+V:]; for clevr test it is the size of "
      "the TFDS `test` split although TA reads `validation`.",
  ]
  exp["datasets"] = collections.OrderedDict()
  exp["tasks"] = collections.OrderedDict()
  ds_data = {}
  for name, (rel, id_key) in DATASETS.items():
    info, splits = read_dataset(out_dir, rel)
    dsec = collections.OrderedDict()
    dsec["dir"] = rel
    dsec["dataset_info"] = {k: info.get(k) for k in ("name", "configName", "version",
                                                      "fileFormat", "moduleName")}
    dsec["id_key"] = id_key
    dsec["image_key"] = "image"
    dsec["splits"] = collections.OrderedDict()
    keys = collections.OrderedDict()
    for sname, s in splits.items():
      fmts = collections.Counter(sniff(feat(e, "image")[1][0]) for e in s["examples"])
      ids = [feat(e, id_key)[1][0].decode() for e in s["examples"]]
      assert len(set(ids)) == len(ids)
      dsec["splits"][sname] = {"num_examples": sum(s["lengths"]), "shard_lengths": s["lengths"],
                               "shard_files": s["files"],
                               "filepath_template": s["info"].get("filepathTemplate"),
                               "encoded_formats": dict(fmts),
                               "first_id": ids[0], "last_id": ids[-1]}
      for e in s["examples"]:
        for k, f in e.features.feature.items():
          kind = f.WhichOneof("kind")
          n = len(getattr(f, kind).value) if kind else 0
          kk = keys.setdefault(k, {"kind": kind, "present_in": 0, "min_len": n, "max_len": n})
          kk["present_in"] += 1
          kk["min_len"], kk["max_len"] = min(kk["min_len"], n), max(kk["max_len"], n)
    total = sum(sum(s["lengths"]) for s in splits.values())
    dsec["example_features"] = {k: dict(v, present_in="%d/%d" % (v["present_in"], total))
                                for k, v in sorted(keys.items())}
    exp["datasets"][name] = dsec
    ds_data[name] = (info, splits)

  for task, (dsname, vtab_name, _, ncls) in TASKS.items():
    rel, id_key = DATASETS[dsname]
    info, splits = ds_data[dsname]
    lengths = {k: sum(v["lengths"]) for k, v in splits.items()}
    strings = ta_splits(task, lengths)
    ta = ta_read(ta_mods, task, out_dir) if ta_mods else None
    tsec = collections.OrderedDict()
    tsec["dataset"] = dsname
    tsec["vpt_name"] = vtab_name
    tsec["num_classes"] = ncls
    tsec["label_rule"] = LABEL_RULES[task]
    tsec["splits"] = collections.OrderedDict()
    for split in VTAB_SPLITS:
      s_str = strings[split]
      exs = []
      for (sname, a, b) in parse_split_string(s_str, lengths):
        exs += splits[sname]["examples"][a:b]
      ids = [feat(e, id_key)[1][0].decode() for e in exs]
      labels = [label_of(task, e) for e in exs]
      # TFDS in plain shard order (one file at a time) must agree with our own shard walk.
      b = tfds.builder(rel.rsplit("/", 1)[0] + ":" + info["version"], data_dir=out_dir)
      seq = b.as_dataset(split=s_str, shuffle_files=False,
                         read_config=tfds.ReadConfig(interleave_cycle_length=1),
                         decoders={"image": tfds.decode.SkipDecoding()})
      seq_ids = [x[id_key].decode() for x in tfds.as_numpy(seq)]
      assert seq_ids == ids, (task, split)
      dflt = b.as_dataset(split=s_str, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
      yield_ids = [x[id_key].decode() for x in tfds.as_numpy(dflt)]
      pos = {i: k for k, i in enumerate(ids)}
      assert len(pos) == len(ids) and sorted(yield_ids) == sorted(ids), (task, split, len(ids), len(yield_ids), len(set(yield_ids)))
      yield_order = [pos[i] for i in yield_ids]
      # Decoded images.
      entries, digest = [], hashlib.sha256()
      for e in exs:
        enc = feat(e, "image")[1][0]
        ent, img = decoded_entry(enc, sniff(enc))
        digest.update(img.tobytes())
        entries.append(ent)
      sha_by_id = {i: ent["sha256"] for i, ent in zip(ids, entries)}
      sec = collections.OrderedDict()
      sec["tfds_split"] = s_str
      sec["num_examples"] = len(ids)
      if ta:
        t = ta[split]
        assert t["tfds_split"] == s_str, (task, split, t["tfds_split"], s_str)
        assert t["num_classes"] == ncls
        assert t["ids"] == yield_ids, (task, split)
        ta_label = dict(zip(t["ids"], t["labels"]))
        assert [ta_label[i] for i in ids] == labels, (task, split)
        assert [sha_by_id[i] for i in t["ids"]] == t["shas"], (task, split)
        sec["ta_num_samples"] = t["num_samples"]
      assert all(0 <= l < ncls for l in labels)
      sec["first_id"], sec["last_id"] = ids[0], ids[-1]
      sec["label_histogram"] = [labels.count(c) for c in range(ncls)]
      sec["pixels_sha256"] = digest.hexdigest()
      if split != "train800val200":
        if task != "clevr_closest_object_distance":
          sec["ids"] = ids
        sec["labels"] = labels
        if task != "clevr_closest_object_distance":
          shapes = [ent["shape"] for ent in entries]
          if all(sh == shapes[0] for sh in shapes):
            sec["image_shape"] = shapes[0]
          else:
            sec["image_shapes"] = shapes
          sec["image_encoded_len"] = [ent["encoded_len"] for ent in entries]
          sec["image_sha256_16"] = [ent["sha256"][:16] for ent in entries]
          if "channel_sums" in entries[0]:
            sec["image_channel_sums"] = [ent["channel_sums"] for ent in entries]
      sec["tfds_yield_order"] = yield_order
      tsec["splits"][split] = sec
    exp["tasks"][task] = tsec

  # A few full decoded JPEGs for a per-pixel tolerance check.
  dsname = "eurosat"
  raw = collections.OrderedDict()
  _, splits = ds_data[dsname]
  tr = exp["tasks"]["eurosat"]["splits"]
  byid = {feat(e, "filename")[1][0].decode(): e for e in splits["train"]["examples"]}
  for i in (tr["train800"]["first_id"], tr["test"]["last_id"]):
    _, img = decoded_entry(feat(byid[i], "image")[1][0], "jpeg")
    raw[i] = {"shape": list(img.shape), "rgb_base64": base64.b64encode(img.tobytes()).decode()}
  exp["datasets"]["eurosat"]["decoded_pixels"] = raw
  return exp


# --------------------------------------------------------------------------------------------
# 4. Corrupted copies
# --------------------------------------------------------------------------------------------

def record_spans(data):
  """[(header_offset, data_offset, data_len)] of TFRecord framing (u64 len, u32 crc, data, u32 crc)."""
  spans, off = [], 0
  while off + 12 <= len(data):
    n = int.from_bytes(data[off:off + 8], "little")
    spans.append((off, off + 12, n))
    off += 12 + n + 4
  assert off == len(data)
  return spans


def tf_read_outcome(path):
  n, err = 0, None
  try:
    for _ in tf.data.TFRecordDataset(path):
      n += 1
  except tf.errors.OpError as e:  # noqa: PERF203
    err = {"type": type(e).__name__, "message": short_error(e)}
  return {"records_read_before_error": n, "error": err}


def short_error(e):
  m = re.search(r"(corrupted|truncated) record at \d+", e.message)
  return m.group(0) if m else e.message.splitlines()[0]


def make_corrupt(out_dir, corrupt_dir):
  src = os.path.join(out_dir, "cifar100/3.0.2")
  result = collections.OrderedDict()
  result["notes"] = ("Copies of cifar100/3.0.2 metadata with only the `test` shards "
                     "(train shards absent on purpose); one shard damaged.")
  for kind in ("crc", "truncated"):
    d = os.path.join(corrupt_dir, kind, "cifar100/3.0.2")
    os.makedirs(d)
    for f in sorted(os.listdir(src)):
      if "-train." not in f:
        shutil.copy(os.path.join(src, f), d)
    if kind == "crc":
      shard, rec = "cifar100-test.tfrecord-00001-of-00004", 3
      p = os.path.join(d, shard)
      data = bytearray(open(p, "rb").read())
      _, doff, n = record_spans(bytes(data))[rec]
      off = doff + n // 2
      before = data[off]
      data[off] ^= 0x01
      open(p, "wb").write(bytes(data))
      info = {"shard": shard, "record_index": rec, "byte_offset": off,
              "byte_before": before, "byte_after": data[off],
              "what": "one bit flipped in the middle of record %d's data; the data CRC no "
                      "longer matches (framing and length CRC intact)" % rec}
    else:
      shard, rec = "cifar100-test.tfrecord-00002-of-00004", 5
      p = os.path.join(d, shard)
      data = open(p, "rb").read()
      spans = record_spans(data)
      _, doff, n = spans[rec]
      cut = doff + n // 2
      open(p, "wb").write(data[:cut])
      info = {"shard": shard, "record_index": rec, "original_len": len(data), "truncated_len": cut,
              "records_in_shard": len(spans),
              "what": "file cut in the middle of record %d's data" % rec}
    info["dir"] = os.path.join(kind, "cifar100/3.0.2")
    info["tf_record_dataset"] = tf_read_outcome(p)
    b = tfds.builder("cifar100:3.0.2", data_dir=os.path.join(corrupt_dir, kind))
    n, err = 0, None
    try:
      for _ in tfds.as_numpy(b.as_dataset(split="test", shuffle_files=False)):
        n += 1
    except tf.errors.OpError as e:
      err = {"type": type(e).__name__, "message": short_error(e)}
    info["tfds_as_dataset_test"] = {"examples_yielded_before_error": n, "error": err}
    result[kind] = info
  return result


# --------------------------------------------------------------------------------------------

def dump_json(o, indent=0):
  """JSON with lists of scalars and small flat dicts on one line."""
  pad, pad1 = " " * indent, " " * (indent + 1)
  def scalar_or_short(x):
    return not isinstance(x, (dict, list)) or (
        isinstance(x, list) and len(x) <= 4 and all(not isinstance(y, (dict, list)) for y in x))
  def flat(v):
    return not isinstance(v, (dict, list)) or (
        isinstance(v, list) and all(scalar_or_short(x) for x in v))
  if isinstance(o, dict):
    if all(flat(v) and (not isinstance(v, list) or len(v) <= 4) for v in o.values()) and len(o) <= 6:
      return json.dumps(o)
    items = ["%s%s: %s" % (pad1, json.dumps(k), dump_json(v, indent + 1)) for k, v in o.items()]
    return "{\n" + ",\n".join(items) + "\n" + pad + "}"
  if isinstance(o, list) and not flat(o):
    return "[\n" + ",\n".join(pad1 + dump_json(v, indent + 1) for v in o) + "\n" + pad + "]"
  return json.dumps(o)


def main():
  here = os.path.dirname(os.path.abspath(__file__))
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=os.path.join(here, "..", "fixtures", "tfds"))
  ap.add_argument("--corrupt-out", default=os.path.join(here, "..", "fixtures", "tfds-corrupt"))
  ap.add_argument("--ta-src", default="/tmp/ta_src",
                  help="dir holding TA's task_adaptation/ package; '' to skip TA")
  args = ap.parse_args()
  out, corrupt = os.path.abspath(args.out), os.path.abspath(args.corrupt_out)
  for d in (out, corrupt):
    if os.path.exists(d):
      shutil.rmtree(d)
  os.makedirs(out)
  ta_mods = try_import_ta(args.ta_src)
  print("TA imported" if ta_mods else "TA not found: using the re-implementation only")
  with tempfile.TemporaryDirectory() as tmp:
    build_all(out, tmp)
  for junk in ("downloads",):
    shutil.rmtree(os.path.join(out, junk), ignore_errors=True)
  exp = compute_expected(out, ta_mods)
  exp["corrupt"] = make_corrupt(out, corrupt)
  with open(os.path.join(out, "expected.json"), "w") as f:
    f.write(dump_json(exp) + "\n")
  print("wrote", out, "and", corrupt)


if __name__ == "__main__":
  main()
