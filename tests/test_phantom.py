"""Tests for cxrjax.data.phantom (procedural chest-radiograph phantoms)."""

import hashlib
import pickle
import subprocess
import sys

import numpy as np
import pytest

from cxrjax.data import phantom as P

NF = len(P.FINDINGS)


@pytest.fixture(scope='module')
def batch32():
    """~400 small renders shared by the prevalence and subtlety tests."""
    exs = [P.render(i, seed=0, size=32) for i in range(400)]
    labels = np.stack([e['labels'] for e in exs])
    images = np.stack([e['image'] for e in exs])
    return exs, labels, images


def _digest(ex):
    h = hashlib.sha256()
    for k in ('image', 'labels', 'seg', 'boxes'):
        h.update(ex[k].tobytes())
    h.update(ex['view'].encode() + ex['id'].encode())
    return h.hexdigest()


def _auroc(scores, labels):
    """Mann-Whitney AUROC with average ranks for ties."""
    scores = np.asarray(scores, float)
    labels = np.asarray(labels, bool)
    order = np.argsort(scores, kind='mergesort')
    ranks = np.empty(len(scores))
    sorted_s = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    n_pos, n_neg = labels.sum(), (~labels).sum()
    return (ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def test_auroc_helper():
    assert _auroc([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == 1.0
    assert _auroc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5


# --------------------------------------------------------------- determinism
def test_deterministic_same_bytes_and_order_independent():
    a = P.render(11, seed=3, size=64)
    P.render(2, seed=3, size=64)  # an unrelated call in between must not matter
    np.random.seed(123)  # nor the global RNG state
    b = P.render(11, seed=3, size=64)
    assert _digest(a) == _digest(b)
    c = P.render(11, seed=4, size=64)
    assert not np.array_equal(a['image'], c['image'])
    assert c['id'] == 'phantom-s4-00000011'


def test_deterministic_across_processes():
    # Load the module file directly so the child process skips the (slow)
    # package import of flax; only numpy is needed to render.
    code = ('import hashlib,importlib.util as u,sys;s=u.spec_from_file_location("ph",sys.argv[1]);'
            'P=u.module_from_spec(s);s.loader.exec_module(P);e=P.render(11,seed=3,size=64);'
            'print(hashlib.sha256(e["image"].tobytes()+e["seg"].tobytes()+e["boxes"].tobytes()).hexdigest())')
    out = subprocess.run([sys.executable, '-c', code, P.__file__], capture_output=True, text=True, check=True)
    e = P.render(11, seed=3, size=64)
    want = hashlib.sha256(e['image'].tobytes() + e['seg'].tobytes() + e['boxes'].tobytes()).hexdigest()
    assert out.stdout.strip() == want


# ------------------------------------------------------------ size handling
@pytest.mark.parametrize('index', range(12))
def test_labels_view_independent_of_size(index):
    ref = P.render(index, size=224)
    for size in (16, 33, 100):
        ex = P.render(index, size=size)
        np.testing.assert_array_equal(ex['labels'], ref['labels'])
        assert ex['view'] == ref['view'] and ex['id'] == ref['id']
        # Same boxes (classes and, scaled, geometry) at every size.
        k = ref['boxes'][:, 0]
        np.testing.assert_array_equal(ex['boxes'][:, 0], k)
        pos = k >= 0
        analytic = pos & (k != 0)  # heart box is measured on the raster: +-1 px
        np.testing.assert_allclose(ex['boxes'][analytic, 1:] * (224 / size),
                                   ref['boxes'][analytic, 1:], atol=1e-3)
        np.testing.assert_allclose(ex['boxes'][k == 0, 1:] * (224 / size),
                                   ref['boxes'][k == 0, 1:], atol=1.5 * 224 / size)


@pytest.mark.parametrize('size', [16, 32, 64, 224, 300])
def test_dtypes_and_shapes(size):
    ex = P.render(5, size=size)
    assert set(ex) == {'image', 'labels', 'seg', 'boxes', 'view', 'id'}
    assert ex['image'].dtype == np.uint8 and ex['image'].shape == (size, size)
    assert ex['seg'].dtype == np.uint8 and ex['seg'].shape == (size, size)
    assert set(np.unique(ex['seg'])) <= {0, 1, 2}
    assert ex['labels'].dtype == np.float32 and ex['labels'].shape == (NF,)
    assert set(np.unique(ex['labels'])) <= {0.0, 1.0}
    assert ex['boxes'].dtype == np.float32 and ex['boxes'].shape == (P.MAX_BOXES, 5)
    assert ex['view'] in ('PA', 'AP')
    assert ex['id'] == 'phantom-s0-00000005'
    assert P.SEG_CLASSES == ('background', 'lung', 'heart')
    assert P.FINDINGS == ('cardiomegaly', 'effusion', 'nodule', 'pneumothorax',
                          'consolidation', 'foreign_object')


def test_large_size_renders():
    ex = P.render(1, size=1024)
    assert ex['image'].shape == (1024, 1024) and ex['image'].std() > 20


# ------------------------------------------------------ boxes and masks
@pytest.mark.parametrize('index', range(40))
def test_boxes_valid_and_consistent_with_labels_and_masks(index):
    size = 160
    ex = P.render(index, size=size)
    boxes, labels, seg = ex['boxes'], ex['labels'], ex['seg']
    k = boxes[:, 0]
    n = int((k >= 0).sum())
    assert np.all(k[:n] >= 0) and np.all(boxes[n:] == -1)  # padding rows at the end
    assert np.all(np.diff(k[:n]) >= 0)  # sorted by class
    for c in range(NF):
        assert bool(labels[c]) == bool(np.any(k == c)), (P.FINDINGS[c], labels, k)
    for cls, x0, y0, x1, y1 in boxes[:n]:
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size, (cls, x0, y0, x1, y1)
    heart = seg == 2
    if labels[0]:
        ys, xs = np.nonzero(heart)
        (hb,) = boxes[k == 0]
        np.testing.assert_allclose(hb[1:], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1)
    for _, x0, y0, x1, y1 in boxes[k == 2]:  # nodule box inside the lung mask
        patch = seg[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))]
        assert seg[int((y0 + y1) / 2), int((x0 + x1) / 2)] == 1
        assert (patch == 1).mean() > 0.9
    for code in (1, 3, 4):  # effusion / pneumothorax / consolidation: boxes overlap lung
        for _, x0, y0, x1, y1 in boxes[k == code]:
            patch = seg[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))]
            assert (patch == 1).mean() > 0.3


@pytest.mark.parametrize('index', range(0, 400, 40))
def test_masks_lungs_and_heart_anatomy(index):
    size = 128
    seg = P.render(index, size=size)['seg']
    lung, heart = seg == 1, seg == 2
    half = size // 2
    # Two lungs, one each side of the midline, each a sizeable area.
    assert lung[:, :half].mean() > 0.1 and lung[:, half:].mean() > 0.1
    # Heart: present in every image, between the lungs, bulging to the image
    # right (the patient's left in radiological display). The patient may be
    # shifted in the frame, so the midline is taken halfway between the lungs.
    cols = np.flatnonzero(lung.any(axis=0))
    mid = (cols[0] + cols[-1] + 1) // 2
    ys, xs = np.nonzero(heart)
    assert heart.mean() > 0.03
    assert mid - 0.02 * size < xs.mean() < mid + 0.15 * size
    assert 0.45 * size < ys.mean() < 0.85 * size
    assert heart[:, mid:].sum() > heart[:, :mid].sum()
    assert heart[:, mid].any()  # it straddles the midline
    # The heart's left border (image right) is the left lung's medial edge.
    assert np.any(heart[:, :-1] & lung[:, 1:])


def test_each_finding_changes_pixels_inside_its_box():
    # White-box check: removing a finding from the case changes the image
    # inside (and essentially only inside) its box.
    keys = {1: 'effusion', 2: 'nodule', 3: 'ptx', 4: 'consolidation', 5: 'foreign'}
    seen = set()
    size = 96
    for index in range(60):
        C = P._sample_case(index, 0)
        ex = P.render(index, size=size)
        for cls, key in keys.items():
            if cls in seen or not C[key]:
                continue
            C2 = dict(C, **{key: []})
            img1, _, _ = P._render_case(C, size, np.random.default_rng(0))
            img2, _, _ = P._render_case(C2, size, np.random.default_rng(0))
            diff = np.abs(img1.astype(int) - img2.astype(int)) > 2
            inside = np.zeros_like(diff)
            for _, x0, y0, x1, y1 in ex['boxes'][ex['boxes'][:, 0] == cls]:
                inside[max(int(y0) - 2, 0):int(np.ceil(y1)) + 2, max(int(x0) - 2, 0):int(np.ceil(x1)) + 2] = True
            assert diff.sum() > 0, key
            assert diff[inside].sum() >= 0.9 * diff.sum(), key
            seen.add(cls)
    assert seen == set(keys)


# ---------------------------------------------------------------- statistics
def test_prevalence_within_band(batch32):
    exs, labels, _ = batch32
    prev = labels.mean(axis=0)
    for j, name in enumerate(P.FINDINGS):
        assert 0.12 <= prev[j] <= 0.33, (name, prev[j])
        assert abs(prev[j] - P.PREVALENCE[name]) < 0.07, (name, prev[j])
    ap = np.mean([e['view'] == 'AP' for e in exs])
    assert 0.22 <= ap <= 0.38
    # Independent draws: co-occurrence happens.
    assert (labels.sum(axis=1) >= 2).any() and (labels.sum(axis=1) == 0).any()


def test_nodule_not_visible_as_global_brightness(batch32):
    _, labels, images = batch32
    mean_intensity = images.reshape(len(images), -1).mean(axis=1)
    auc = _auroc(mean_intensity, labels[:, 2])
    assert max(auc, 1 - auc) < 0.65, auc


# ------------------------------------------------------------------- source
def test_splits_are_disjoint():
    ids = {}
    for split in ('train', 'val', 'test'):
        src = P.PhantomSource(20, seed=0, size=16, split=split)
        ids[split] = {src[i]['id'] for i in range(20)}
        assert len(ids[split]) == 20
    assert not ids['train'] & ids['val']
    assert not ids['train'] & ids['test']
    assert not ids['val'] & ids['test']
    # The same split is reproducible and the train split equals render().
    assert P.PhantomSource(5, size=32)[3]['id'] == P.render(3, size=32)['id']


def test_source_pickle_and_repr():
    src = P.PhantomSource(10, seed=2, size=32, split='val')
    clone = pickle.loads(pickle.dumps(src))
    assert len(clone) == 10
    assert repr(clone) == repr(src) == "PhantomSource(num_examples=10, seed=2, size=32, split='val')"
    assert _digest(clone[4]) == _digest(src[4])


def test_source_in_grain_mapdataset():
    grain = pytest.importorskip('grain')
    src = P.PhantomSource(6, seed=1, size=32)
    ds = grain.MapDataset.source(src).map(lambda ex: (ex['image'].astype(np.float32) / 255.0, ex['labels']))
    assert len(ds) == 6
    img, lab = ds[2]
    assert img.shape == (32, 32) and lab.shape == (NF,)
    np.testing.assert_array_equal(img, src[2]['image'].astype(np.float32) / 255.0)
    items = list(ds.to_iter_dataset())
    assert len(items) == 6


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize('kwargs, match', [
    (dict(index=-1), r'index.*-1'),
    (dict(index=1.5), r'index.*1\.5'),
    (dict(index=0, size=15), r'size.*15'),
    (dict(index=0, size=8), r'size.*8'),
    (dict(index=0, seed=-2), r'seed.*-2'),
])
def test_render_bad_input(kwargs, match):
    index = kwargs.pop('index')
    with pytest.raises(ValueError, match=match):
        P.render(index, **kwargs)


def test_source_bad_input():
    src = P.PhantomSource(5, size=32)
    with pytest.raises(ValueError, match=r'index.*\[0, 5\).*5'):
        src[5]
    with pytest.raises(ValueError, match=r'index.*-1'):
        src[-1]
    with pytest.raises(ValueError, match=r"split.*'dev'"):
        P.PhantomSource(5, split='dev')
    with pytest.raises(ValueError, match=r'size.*4'):
        P.PhantomSource(5, size=4)
    with pytest.raises(ValueError, match=r'num_examples.*0'):
        P.PhantomSource(0)


def test_save_example_grid(tmp_path):
    path = tmp_path / 'grid.png'
    P.save_example_grid(str(path), n=2, size=32)
    from PIL import Image
    im = Image.open(path)
    assert im.size[0] > 50 and im.size[1] > 50
