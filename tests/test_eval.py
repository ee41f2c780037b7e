"""Evaluation: the Fréchet distance and its statistics, the i3d and indomain extractors, class accuracy."""

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eflow.api import conforms
from eflow.errors import EflowError
from eflow.eval import frechet as frechet_mod
from eflow.eval.accuracy import ClassTally
from eflow.eval.classifier import classifier_path, load_classifier, save_classifier
from eflow.eval.classifier_training import ClassifierTraining, train_classifier
from eflow.eval.clips import load_clips, split_indices
from eflow.eval.extractor import create_extractor, extract, to_uint8, to_unit_range
from eflow.eval.frechet import FeatureStats, frechet_between, frechet_distance
from eflow.eval.real_stats import real_statistics, stats_record
from eflow.registry import get_registry, hookimpl, host

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script's notice
CLIP = (8, 16, 16)  # frames, height, width of the classifier tests


def gaussian_features(n, dim, seed, offset=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) * scale + offset


def stats_of(x):
    s = FeatureStats(x.shape[1])
    s.update(x)
    return s


def reference_trace_sqrt(s1, s2):
    """tr((S1 S2)^{1/2}) through symmetric eigendecompositions (exact for PSD matrices)."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()


# ----- Fréchet distance ---------------------------------------------------------------------------


def test_frechet_of_a_set_with_itself_is_zero_and_the_distance_is_symmetric():
    a, b = stats_of(gaussian_features(500, 16, 0)), stats_of(gaussian_features(500, 16, 1, offset=0.5))
    same = frechet_between(a, a)
    assert same.value == pytest.approx(0.0, abs=1e-8) and same.eps_added == 0.0
    ab, ba = frechet_between(a, b).value, frechet_between(b, a).value
    assert ab > 1.0 and ab == pytest.approx(ba, rel=1e-9)


def test_frechet_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    result = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert result.value == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("ddof", [0, 1])
def test_streaming_statistics_equal_a_one_shot_numpy_computation(ddof):
    x = gaussian_features(1003, 12, 2, offset=1e4, scale=1e-2)  # a large offset: cancellation-prone
    stats = FeatureStats(12)
    for i, chunk in enumerate(np.array_split(x, [1, 64, 65, 500])):  # uneven batches, two of size 1
        stats.update(torch.from_numpy(chunk).float() if i == 0 else chunk)  # tensors are accepted too
    x64 = np.concatenate([x[:1].astype(np.float32).astype(np.float64), x[1:]])
    np.testing.assert_allclose(stats.mean(), x64.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(
        stats.covariance(ddof), np.cov(x64, rowvar=False, ddof=ddof), rtol=1e-7, atol=1e-12
    )
    assert stats.n == 1003


def test_near_singular_covariances_give_a_finite_stable_distance():
    rng = np.random.default_rng(3)
    dim, n, rank = 64, 40, 5  # fewer clips than dimensions, rank-deficient features
    basis = rng.normal(size=(rank, dim))
    a = stats_of(rng.normal(size=(n, rank)) @ basis)
    b = stats_of(rng.normal(size=(n, rank)) @ basis * 1.3 + 0.1)
    result = frechet_between(a, b)
    s1, s2 = a.covariance(), b.covariance()
    expected = (
        ((a.mean() - b.mean()) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * reference_trace_sqrt(s1, s2)
    )
    assert np.isfinite(result.value) and result.value >= 0
    assert result.value == pytest.approx(expected, rel=1e-6)
    assert frechet_between(b, a).value == pytest.approx(result.value, rel=1e-6)
    assert frechet_between(a, a).value == pytest.approx(0.0, abs=1e-6 * np.trace(s1))


def test_a_non_finite_square_root_is_retried_with_eps_on_both_covariances(monkeypatch):
    real_sqrtm, calls = scipy.linalg.sqrtm, []

    def flaky_sqrtm(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(frechet_mod.scipy.linalg, "sqrtm", flaky_sqrtm)
    s = np.diag([1.0, 2.0, 0.0])
    result = frechet_distance(np.zeros(3), s, np.ones(3), s, eps=1e-6)
    assert result.eps_added == 1e-6 and len(calls) == 2
    np.testing.assert_allclose(calls[1], (s + 1e-6 * np.eye(3)) @ (s + 1e-6 * np.eye(3)))
    assert result.value == pytest.approx(3.0, abs=1e-5)


# ----- the i3d extractor --------------------------------------------------------------------------


class TinyI3D(nn.Module):
    """An I3D-shaped stand-in with StyleGAN-V's call: uint8 clips, own rescale/resize, 400 logits."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 8, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3))
        self.conv2 = nn.Conv3d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 400)

    def forward(self, x: Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False):
        x = x.float()
        if rescale:
            x = x / 127.5 - 1
        if resize:  # the real one resizes to 224; 32 keeps the test fast
            x = F.interpolate(x, size=(x.shape[2], 32, 32), mode="trilinear", align_corners=False)
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        logits = self.fc(F.adaptive_avg_pool3d(x, 1).flatten(1))
        return logits if return_features else logits.softmax(dim=1)


class PlainI3D(nn.Module):
    """A model that only takes model(x) with x float in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, stride=(1, 8, 8))
        self.fc = nn.Linear(4, 400)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool3d(self.conv(x), 1).flatten(1))


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
    torch.jit.script(TinyI3D().eval()).save(str(path))
    return path


def test_i3d_loads_a_torchscript_file_and_gives_logits_as_features(i3d_file):
    extractor = create_extractor("i3d", {"path": str(i3d_file), "frames": 8})
    assert extractor.dim == 400 and extractor.protocol["frames"] == 8
    assert conforms("feature_extractor", extractor)
    assert "rescale=True, resize=True, return_features=True" in extractor.protocol["call"]
    assert extractor.content_hash.startswith("sha256:") and len(extractor.content_hash) == 71
    clips = torch.randint(0, 256, (3, 3, 10, 24, 24), dtype=torch.uint8)
    feats = extract(extractor, clips)
    assert feats.shape == (3, 400) and feats.dtype == torch.float64
    scripted = torch.jit.load(str(i3d_file))
    expected = scripted(clips[:, :, :8], rescale=True, resize=True, return_features=True)
    torch.testing.assert_close(feats.float(), expected)  # the first 8 frames, logits before softmax


def test_i3d_falls_back_to_a_plain_call(tmp_path):
    path = tmp_path / "plain.pt"
    torch.jit.script(PlainI3D().eval()).save(str(path))
    extractor = create_extractor("i3d", {"path": str(path), "frames": 4})
    assert extractor.protocol["call"].startswith("model(clips in [-1, 1]")
    assert extract(extractor, torch.zeros(2, 3, 4, 8, 8, dtype=torch.uint8)).shape == (2, 400)


def test_i3d_without_a_file_says_how_to_get_one_and_never_downloads(tmp_path, monkeypatch):
    monkeypatch.delenv("EFLOW_I3D_PATH", raising=False)
    with pytest.raises(EflowError, match=r"downloads nothing.*--i3d-path"):
        create_extractor("i3d", {})
    with pytest.raises(EflowError, match="does not exist"):
        create_extractor("i3d", {"path": str(tmp_path / "missing.pt")})


def test_i3d_refuses_clips_shorter_than_its_frame_count(i3d_file):
    extractor = create_extractor("i3d", {"path": str(i3d_file), "frames": 16})
    with pytest.raises(EflowError, match="uses 16 frames per clip but the clips have 8"):
        extractor.check_clip_shape((3, 8, 32, 32))


# ----- the in-domain classifier -------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes():
    return get_registry("dataset").create("shapes", *CLIP, seed=0)


@pytest.fixture(scope="module")
def classifier_file(shapes, tmp_path_factory):
    """A classifier trained briefly on CPU (8 frames of 16x16), saved where `indomain` looks for it."""
    torch.set_num_threads(2)
    settings = ClassifierTraining(train_clips=1500, heldout_clips=500, epochs=3, net_width=16, seed=0)
    model, meta = train_classifier(shapes, settings, torch.device("cpu"))
    meta.update(dataset="shapes", dataset_options={}, clip=list(CLIP))
    cache = tmp_path_factory.mktemp("cache")
    path = save_classifier(classifier_path("shapes", {}, *CLIP, cache_dir=cache), model, meta)
    return path


def test_indomain_classifier_reaches_high_held_out_accuracy_on_shapes(classifier_file):
    _, meta = load_classifier(classifier_file)
    held = meta["heldout"]
    assert held["n"] == 500 and len(held["per_class"]) == 10
    assert held["accuracy"] >= 0.9, held  # measured 0.964 with this budget


def test_indomain_is_found_from_the_dataset_and_clip_shape(classifier_file):
    cache = classifier_file.parent.parent
    context = {
        "dataset": "shapes",
        "dataset_options": {},
        "clip_frames": 8,
        "clip_height": 16,
        "clip_width": 16,
        "cache_dir": str(cache),
    }
    extractor = create_extractor("indomain", {}, context)
    assert extractor.metric_label == "in-domain FVD" and extractor.dim == 64
    assert conforms("feature_extractor", extractor)
    assert extractor.path == classifier_file
    extractor.check_clip_shape((3, *CLIP))
    with pytest.raises(EflowError, match="takes 3x8x16x16 clips"):
        extractor.check_clip_shape((3, 8, 32, 32))
    other = {**context, "clip_height": 32, "clip_width": 32}
    with pytest.raises(
        EflowError, match=r"eflow eval train-extractor --data shapes --frames 8 --size 32x32 --cache-dir"
    ):
        create_extractor("indomain", {}, other)


class UnlabelledClips:
    """A dataset plugin whose items carry no label."""

    @hookimpl
    def register_datasets(self, register):
        register(
            "unlabelled",
            lambda frames, height, width, seed=0: [{"video": torch.zeros(3, frames, height, width)}],
        )


def test_indomain_on_a_dataset_without_labels_says_to_use_i3d(fresh_host, tmp_path):
    host().register(UnlabelledClips(), name="unlabelled-test")
    context = {
        "dataset": "unlabelled",
        "clip_frames": 2,
        "clip_height": 8,
        "clip_width": 8,
        "cache_dir": str(tmp_path),
    }
    with pytest.raises(EflowError, match=r"has no class labels.*--extractor i3d"):
        create_extractor("indomain", {}, context)


def test_fd_between_real_splits_is_far_smaller_than_against_noise_or_shuffled_frames(classifier_file, shapes):
    extractor = create_extractor("indomain", {"path": str(classifier_file)})
    first, second = split_indices(len(shapes), [300, 300], seed=7)
    real_a, _ = load_clips(shapes, first)
    real_b, _ = load_clips(shapes, second)
    order = torch.stack(
        [torch.randperm(CLIP[0], generator=torch.Generator().manual_seed(i)) for i in range(300)]
    )
    shuffled = torch.stack([clip[:, order[i]] for i, clip in enumerate(real_b)])
    noise = torch.randint(0, 256, real_b.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a = stats_of(extract(extractor, real_a).numpy())
    fd = {
        name: frechet_between(a, stats_of(extract(extractor, x).numpy())).value
        for name, x in (("real", real_b), ("shuffled", shuffled), ("noise", noise))
    }
    assert fd["real"] * 5 < fd["shuffled"] and fd["real"] * 20 < fd["noise"], fd


def test_real_statistics_are_cached_per_dataset_extractor_and_n(classifier_file, shapes, tmp_path):
    extractor = create_extractor("indomain", {"path": str(classifier_file)})
    record = stats_record("shapes", {}, 0, CLIP, extractor, num=40, subset_seed=0)
    first, info = real_statistics(shapes, record, extractor, batch_size=16, cache_dir=tmp_path)
    again, info_again = real_statistics(shapes, record, extractor, batch_size=16, cache_dir=tmp_path)
    assert not info["cache_hit"] and info_again["cache_hit"] and first.n == again.n == 40
    np.testing.assert_array_equal(first.covariance(), again.covariance())
    other, info_other = real_statistics(
        shapes, {**record, "num": 30}, extractor, batch_size=16, cache_dir=tmp_path
    )
    assert not info_other["cache_hit"] and other.n == 30


# ----- small pieces -------------------------------------------------------------------------------


def test_class_tally_counts_overall_and_per_class_accuracy():
    tally = ClassTally(3, ["a", "b", "c"])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = F.one_hot(torch.tensor([0, 1, 1, 1, 2, 0]), 3).float()
    tally.update(labels, logits)
    assert tally.overall() == pytest.approx(4 / 6)
    assert tally.per_class() == {
        "a": {"accuracy": 0.5, "n": 2},
        "b": {"accuracy": 1.0, "n": 2},
        "c": {"accuracy": 0.5, "n": 2},
    }


def test_uint8_quantization_round_trips_within_half_a_level():
    x = torch.linspace(-1, 1, 1001)
    q = to_uint8(x)
    assert q.dtype == torch.uint8 and int(q[0]) == 0 and int(q[-1]) == 255
    assert (to_unit_range(q) - x).abs().max() <= 0.5 / 127.5 + 1e-6
    assert int(to_uint8(torch.tensor([3.0, -2.0]))[0]) == 255  # out-of-range values clamp


def test_split_indices_are_disjoint_and_deterministic():
    a, b = split_indices(100, [30, 50], seed=1)
    assert len(set(a) | set(b)) == 80 and (a, b) == tuple(split_indices(100, [30, 50], seed=1))
    with pytest.raises(EflowError, match="dataset has 100"):
        split_indices(100, [60, 50], seed=1)
