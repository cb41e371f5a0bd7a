"""Units of the training side: the held-out/validation split, metrics, threshold, temperature."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import DATA

from shared.dataset import MIN_VAL_PER_CLASS, VAL_FRACTION, held_out_folds, patient_key, training_size_problem
from shared.evaluation import metrics_at_threshold
from shared.labels import CLASS_NAMES
from training_job.data import Augment, group_ids, grouped_split
from training_job.metrics import choose_threshold, fit_temperature, threshold_for_policy
from training_job.models import build_model


def test_grouped_split_on_the_real_file_list_never_shares_a_patient_or_duplicate():
    rows = list(csv.DictReader(open(DATA / "manifest.csv")))
    rels = [r["relative_path"] for r in rows]
    digests = [r["sha256"] for r in rows]
    labels = np.asarray([CLASS_NAMES.index(r["label"]) for r in rows])
    patients = [patient_key(r) for r in rels]
    keep, held = grouped_split(labels, group_ids(patients, digests), 0.15, seed=42)
    assert len(set(keep) | set(held)) == len(rows) and not set(keep) & set(held)
    assert not {patients[i] for i in keep} & {patients[i] for i in held}
    assert not {digests[i] for i in keep} & {digests[i] for i in held}
    assert 0.12 < len(held) / len(rows) < 0.18
    assert abs(labels[held].mean() - labels.mean()) < 0.03  # stratified: same class balance


def test_the_too_small_rule_matches_the_split_training_makes():
    """At the rule's bound the patient-grouped split gives validation exactly --min-val-per-class per class."""
    need = MIN_VAL_PER_CLASS * held_out_folds(VAL_FRACTION)
    assert need == 140
    labels = np.repeat([0, 1], need)
    _, held = grouped_split(labels, np.arange(2 * need), VAL_FRACTION, seed=42)
    assert np.bincount(labels[held]).tolist() == [MIN_VAL_PER_CLASS, MIN_VAL_PER_CLASS]
    assert training_size_problem({"train": {"NORMAL": need, "PNEUMONIA": need}}) is None
    assert training_size_problem({"train": {"NORMAL": need - 1, "PNEUMONIA": 4000}}) == (
        "NORMAL 139, PNEUMONIA 4000 images: 1 in 7 is split off by patient to validate, about 19 per class, "
        "fewer than 20; give 140 or more per class, or a val/ split with 20 or more per class")
    # a val split below --min-val-per-class is merged into train: the pooled counts decide
    assert training_size_problem({"train": {"NORMAL": 121, "PNEUMONIA": 200}, "val": {"NORMAL": 19, "PNEUMONIA": 8}}) is None
    # a val split large enough validates as given; train then needs as many per class
    assert training_size_problem({"train": {"NORMAL": 20, "PNEUMONIA": 20}, "val": {"NORMAL": 20, "PNEUMONIA": 20}}) is None
    assert training_size_problem({"train": {"NORMAL": 19, "PNEUMONIA": 50}, "val": {"NORMAL": 20, "PNEUMONIA": 25}}) == (
        "train/NORMAL has 19 images, fewer than the 20 per class of the val split: add training images")


def test_metrics_at_threshold_known_case():
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.4, 0.6, 0.3, 0.7, 0.8, 0.9])
    m = metrics_at_threshold(y, p, 0.5)
    assert m["confusion_matrix"] == {"tn": 2, "fp": 1, "fn": 1, "tp": 3}
    assert m["sensitivity"] == 0.75 and abs(m["specificity"] - 2 / 3) < 1e-12 and m["precision"] == 0.75


def test_threshold_policies():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(300), np.ones(700)].astype(int)
    p = np.r_[rng.beta(2, 5, 300), rng.beta(5, 2, 700)]
    t_youden = choose_threshold(y, p)
    t_sens = choose_threshold(y, p, target_sensitivity=0.97)
    assert metrics_at_threshold(y, p, t_sens)["sensitivity"] >= 0.97
    assert t_sens < t_youden


def test_temperature_scaling_fixes_overconfidence():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 2000)
    true_logit = np.where(y == 1, 1.0, -1.0) + rng.normal(0, 1.5, 2000)
    logits = np.stack([-true_logit, true_logit], 1) * 4  # 4x overconfident
    t = fit_temperature(logits, y)
    assert 7.0 < t < 11.0  # the Bayes-optimal log-odds here are 0.89 v against 8 v given: T = 9


def test_augmentation_keeps_shape_range_and_is_seeded():
    x = torch.rand(4, 1, 32, 32) * 255
    a = Augment.preset("strong")
    out1 = a(x, torch.Generator().manual_seed(3))
    out2 = a(x, torch.Generator().manual_seed(3))
    assert out1.shape == x.shape and float(out1.min()) >= 0 and float(out1.max()) <= 255
    assert torch.equal(out1, out2) and not torch.equal(out1, x)


@pytest.mark.parametrize("rotate_deg", [0, 5])  # the batch resize and the per-image affine paths
def test_augmentation_scale_range_sets_the_image_side_in_the_frame(rotate_deg):
    # A 20 x 20 white square in the middle of a black 40 x 40 frame, no other change.
    x = torch.zeros(2, 1, 40, 40)
    x[:, :, 10:30, 10:30] = 255
    still = dict(rotate_deg=rotate_deg, translate=0.0, brightness=0.0, contrast=0.0, gamma=0.0, noise=0.0)
    for side, expected_area in ((0.5, 100), (1.5, 900)):
        out = Augment(scale=(side, side), **still)(x.clone(), torch.Generator().manual_seed(0))
        area = (out > 127.5).float().sum(dim=(1, 2, 3))
        assert torch.all((area - expected_area).abs() <= 0.12 * expected_area), area
    # Shrunk, the frame around the image repeats its border (black here), never zeros of padding
    # on a white border: a white frame stays white.
    out = Augment(scale=(0.5, 0.5), **still)(255 - x, torch.Generator().manual_seed(0))
    assert float(out[:, :, 0, 0].min()) == 255 and float(out[:, :, :3, :].min()) == 255
    # The range is drawn from: a shrinking-only range never reaches the side of 0.95, and on
    # average the area is 400 E[s^2] for s uniform on 0.7-0.95, (0.95^3 - 0.7^3) / (3 x 0.25) = 0.686.
    a = Augment(scale=(0.7, 0.95), **still)
    areas = torch.cat([(a(x.clone(), torch.Generator().manual_seed(seed)) > 127.5).float().sum(dim=(1, 2, 3))
                       for seed in range(20)])
    assert float(areas.max()) <= 400 * 0.95 ** 2 * 1.02 and float(areas.min()) >= 400 * 0.7 ** 2 * 0.95, areas
    assert abs(float(areas.mean()) - 400 * 0.686) <= 0.1 * 400 * 0.686, areas


def test_recipe_scale_range_belongs_to_its_preset():
    """The ``cpu`` recipe's scale range was chosen with its preset (``medium``): another preset keeps
    its own range unless ``--augment-scale`` is given; ``preset`` asks for the preset's own."""
    from conftest import DATA_224

    from training_job.recipes import RECIPES
    from training_job.train import make_augment, parse_args

    train = ["--train", str(DATA_224 / "train")]

    def scale(*argv):
        augment = make_augment(parse_args([*train, *argv]))
        return None if augment is None else augment.scale

    assert scale() == tuple(RECIPES["cpu"]["augment_scale"]) == (0.7, 1.1)
    assert scale("--augment", "medium") == (0.7, 1.1)  # the recipe's own preset, named
    assert scale("--augment-scale", "preset") == Augment.preset("medium").scale == (0.9, 1.1)
    assert scale("--augment", "strong") == Augment.preset("strong").scale == (0.85, 1.15)
    assert scale("--augment", "strong", "--augment-scale", "0.6,1.0") == (0.6, 1.0)
    assert scale("--recipe", "gpu") == (0.85, 1.15)  # the gpu recipe's strong preset, its own range
    assert scale("--augment", "none") is None and scale("--augment", "none", "--augment-scale", "0.6,1.0") is None
    hflip = make_augment(parse_args([*train, "--hflip"]))
    assert hflip.hflip and hflip.scale == (0.7, 1.1) and not make_augment(parse_args(train)).hflip


def test_recipe_sets_defaults_and_flags_override():
    from conftest import DATA_224

    from training_job.train import parse_args

    gpu = parse_args(["--train", str(DATA_224 / "train"), "--recipe", "gpu", "--epochs", "3"])
    assert (gpu.architecture, gpu.pretrained, gpu.image_size, gpu.epochs) == ("efficientnet_lite0", True, 224, 3)
    cpu = parse_args(["--train", str(DATA_224 / "train")])
    assert (cpu.recipe, cpu.architecture, cpu.pretrained, cpu.image_size) == ("cpu", "efficientnet_lite0", True, 160)
    assert cpu.threshold_policy == "sensitivity" and cpu.target_sensitivity == 0.95 and cpu.soup == 3
    quick = parse_args(["--train", str(DATA_224 / "train"), "--recipe", "quick"])
    assert (quick.architecture, quick.pretrained, quick.image_size, quick.limit_per_class) == ("resnet10", False, 128, 400)
    assert quick.threshold_policy == "sensitivity" and quick.target_sensitivity == 0.95
    # Another architecture does not inherit the recipe's pretrained weights unless asked for.
    other = parse_args(["--train", str(DATA_224 / "train"), "--architecture", "seed_cnn"])
    assert other.pretrained is False and other.image_size == 160
    # nor its model soup, which needs pretrained weights and excludes WiSE-FT
    assert other.soup == 1 and (gpu.soup, quick.soup) == (1, 1)
    wise = parse_args(["--train", str(DATA_224 / "train"), "--linear-probe-c", "0.3", "--wise-alpha", "0.5"])
    assert wise.soup == 1
    with pytest.raises(ValueError, match="no pretrained weights exist for seed_cnn"):
        build_model("seed_cnn", pretrained=True)


def test_pretrained_stem_folded_to_one_channel_sees_what_the_rgb_network_saw():
    from efficientnet_lite_pytorch import EfficientNet

    from training_job.models import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        PRETRAINED_GRAY_MEAN,
        PRETRAINED_GRAY_STD,
        efficientnet_lite0_weights,
    )

    gray = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    folded = build_model("efficientnet_lite0", 1, 2, pretrained=True, image_size=64).eval().features.net
    rgb = EfficientNet.from_name("efficientnet-lite0", image_size=64).eval()
    rgb.load_state_dict(torch.load(efficientnet_lite0_weights()["path"], weights_only=True))
    x_rgb = torch.cat([(gray - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)], dim=1)
    with torch.no_grad():
        want = rgb._bn0(rgb._conv_stem(x_rgb))
        got = folded._bn0(folded._conv_stem((gray - PRETRAINED_GRAY_MEAN) / PRETRAINED_GRAY_STD))
    # Exact away from the zero padding, which the two inputs encode differently.
    assert torch.allclose(got[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1], atol=1e-4)
    assert float((got - want).abs().max()) > 1e-3  # the border does differ: the comparison is not vacuous


def test_named_threshold_policies():
    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(200), np.ones(200)].astype(int)
    p = np.clip(y * 0.35 + rng.random(400) * 0.65, 0, 1)
    assert threshold_for_policy("balanced", y, p)[0] == 0.5
    t, text = threshold_for_policy("sensitivity", y, p, 0.95)
    assert metrics_at_threshold(y, p, t)["sensitivity"] >= 0.95 and "0.95" in text
    assert threshold_for_policy("youden", y, p)[0] == choose_threshold(y, p)
    with pytest.raises(ValueError, match="unknown threshold policy"):
        threshold_for_policy("median", y, p)


def test_weight_average_follows_a_short_run_instead_of_the_initial_weights():
    from training_job.engine import ema_decay_at, ema_update_fn

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_update_fn(0.999), use_buffers=True)
    ema.update_parameters(model)  # the first update copies the (untrained) weights
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
        model[1].num_batches_tracked.fill_(7)
    for _ in range(300):  # a short run: 300 optimiser steps
        ema.update_parameters(model)
    averaged = torch.cat([p.flatten() for p in ema.module.parameters()])
    # A fixed 0.999 would still hold 0.999**300 = 74 % of the initial zeros (average 0.26).
    assert float(averaged.min()) > 0.95
    assert int(ema.module[1].num_batches_tracked) == 7
    assert ema_decay_at(0.999, 0) == 0.1 and ema_decay_at(0.999, 100_000) == 0.999
    assert ema_decay_at(0.999, 300) < 0.98


def test_select_metric_chooses_the_best_epoch_by_its_own_figure():
    from training_job.engine import is_better

    best = {"epoch": 1, "val_auc": 0.95, "val_loss": 0.30, "val_acc": 0.90}
    higher_auc_worse_loss = {"epoch": 2, "val_auc": 0.97, "val_loss": 0.40, "val_acc": 0.88}
    assert is_better(higher_auc_worse_loss, best, "roc_auc")
    assert not is_better(higher_auc_worse_loss, best, "loss")
    assert not is_better(higher_auc_worse_loss, best, "accuracy")
    tie = dict(best, epoch=3, val_loss=0.25)  # same AUC, lower loss: the tie goes to the lower loss
    assert is_better(tie, best, "roc_auc")
    assert is_better(best, {"epoch": 0}, "loss")  # nothing chosen yet


def test_acquisition_augmentation_blurs_within_range_and_mixup_trains():
    from training_job.data import Augment, _gaussian_blur

    edge = torch.zeros(1, 1, 16, 16)
    edge[..., 8:] = 255.0
    blurred = _gaussian_blur(edge, 1.5)
    assert blurred.shape == edge.shape and 0 < float(blurred[0, 0, 0, 7]) < 255 and float(blurred[0, 0, 0, 0]) == 0
    x = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 255
    out = Augment.preset("acquisition")(x.clone(), torch.Generator().manual_seed(1))
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 255 and not torch.equal(out, x)

    # mixup: a step on blended images and blended losses moves the weights and gives a finite loss
    from shared.preprocessing import PreprocessSpec
    from training_job.data import Split
    from training_job.engine import train_one_epoch

    torch.manual_seed(0)
    split = Split(torch.randint(0, 255, (8, 32, 32), dtype=torch.uint8), torch.tensor([0, 1] * 4), [""] * 8,
                  [""] * 8, [""] * 8)
    model = build_model("seed_cnn", 1, 2, width=4)
    before = [t.detach().clone() for t in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    total, count = train_one_epoch(
        model, model, split, PreprocessSpec(size=32), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
        torch.amp.GradScaler("cpu", enabled=False), torch.nn.CrossEntropyLoss(), None, None, [torch.arange(8)],
        torch.device("cpu"), False, torch.Generator().manual_seed(2), mixup=0.4)
    assert count == 8 and np.isfinite(total)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_linear_probe_head_gives_the_regressions_probability_and_separates_the_classes():
    from sklearn.linear_model import LogisticRegression

    from shared.preprocessing import PreprocessSpec, normalize
    from training_job.data import Split
    from training_job.engine import fit_linear_probe, head_features

    # Bright images are PNEUMONIA, dark ones NORMAL: a linear rule on pooled features finds it.
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1] * 20)
    pixels = (torch.rand(40, 32, 32, generator=g) * 80 + labels.view(-1, 1, 1) * 120).to(torch.uint8)
    split = Split(pixels, labels, [""] * 40, [""] * 40, [""] * 40)
    spec = PreprocessSpec(size=32)
    torch.manual_seed(0)
    model = build_model("seed_cnn", 1, 2, width=4)
    features_before = head_features(model, split, spec, torch.device("cpu"))
    result = fit_linear_probe(model, split, spec, torch.device("cpu"), c=1.0)
    assert result["train_accuracy"] == 1.0
    # The two-class head's softmax equals the regression's probability of the positive class.
    reference = LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000).fit(
        features_before.double().numpy(), labels.numpy())
    with torch.no_grad():
        probs = torch.softmax(model(normalize(pixels, spec)), 1)[:, 1].double().numpy()
    np.testing.assert_allclose(probs, reference.predict_proba(features_before.double().numpy())[:, 1], atol=1e-5)
    # The features themselves are untouched: only the head was fitted.
    torch.testing.assert_close(head_features(model, split, spec, torch.device("cpu")), features_before)
    with pytest.raises(ValueError, match="must be positive"):
        fit_linear_probe(model, split, spec, torch.device("cpu"), c=0.0)


def test_weight_interpolation_mixes_floats_and_keeps_counters():
    from training_job.engine import interpolate_weights

    initial = {"w": torch.zeros(2, 3), "bn.running_var": torch.ones(2), "bn.num_batches_tracked": torch.tensor(0)}
    final = {"w": torch.full((2, 3), 4.0), "bn.running_var": torch.full((2,), 3.0),
             "bn.num_batches_tracked": torch.tensor(120)}
    mixed = interpolate_weights(initial, final, 0.25)
    torch.testing.assert_close(mixed["w"], torch.full((2, 3), 1.0))
    torch.testing.assert_close(mixed["bn.running_var"], torch.full((2,), 1.5))
    assert int(mixed["bn.num_batches_tracked"]) == 120
    assert torch.equal(interpolate_weights(initial, final, 1.0)["w"], final["w"])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        interpolate_weights(initial, final, 1.5)
    with pytest.raises(ValueError, match="different networks"):
        interpolate_weights({"w": initial["w"]}, final, 0.5)
    with pytest.raises(ValueError, match="has shape"):
        interpolate_weights(dict(initial, w=torch.zeros(3, 2)), final, 0.5)


def test_model_soup_is_the_mean_of_the_networks_weights_and_keeps_the_first_counters():
    from training_job.engine import average_weights

    a = {"w": torch.zeros(2, 3), "bn.running_var": torch.ones(2), "bn.num_batches_tracked": torch.tensor(60)}
    b = {"w": torch.full((2, 3), 3.0), "bn.running_var": torch.full((2,), 2.0), "bn.num_batches_tracked": torch.tensor(7)}
    # a weight average's state dict (AveragedModel): keys prefixed with module., plus its counter
    c = {"module.w": torch.full((2, 3), 6.0), "module.bn.running_var": torch.full((2,), 3.0),
         "module.bn.num_batches_tracked": torch.tensor(9), "n_averaged": torch.tensor(100)}
    soup = average_weights([a, b, c])
    assert set(soup) == {"w", "bn.running_var", "bn.num_batches_tracked"}
    torch.testing.assert_close(soup["w"], torch.full((2, 3), 3.0))
    torch.testing.assert_close(soup["bn.running_var"], torch.full((2,), 2.0))
    assert int(soup["bn.num_batches_tracked"]) == 60
    assert torch.equal(average_weights([b])["w"], b["w"])
    with pytest.raises(ValueError, match="at least one"):
        average_weights([])
    with pytest.raises(ValueError, match="network 2 .* different networks"):
        average_weights([a, {"w": b["w"]}])
    with pytest.raises(ValueError, match=r"weight w has shape \(3, 2\) in network 3"):
        average_weights([a, b, dict(b, w=torch.zeros(3, 2))])


def test_soup_needs_pretrained_weights_and_its_size_stays_out_of_the_checkpoint_key():
    from conftest import DATA_224

    from training_job.train import TrainingError, checkpoint_key, member_dir, parse_args

    train = ["--train", str(DATA_224 / "train")]
    info = {"fingerprint": "f"}
    one, three = parse_args([*train, "--soup", "1"]), parse_args([*train, "--soup", "3"])
    assert (one.soup, three.soup, three.pretrained) == (1, 3, True)
    # The first network of a soup is the run without one; every other network has its own key.
    assert checkpoint_key(one, info) == checkpoint_key(three, info, 0)
    hp = {k: v for k, v in sorted(vars(one).items())
          if k not in {"checkpoint_dir", "model_dir", "output_data_dir", "progress", "workers", "train", "val", "data",
                       "wise_alpha", "soup", "backbone_lr_scale", "tta_zoom_out"}}
    # the formula of checkpoints written before soups (and zoom-out views) existed, which must still resume
    assert checkpoint_key(one, info) == hashlib.sha256(json.dumps([hp, "f"], sort_keys=True, default=str).encode()).hexdigest()
    assert len({checkpoint_key(three, info, m) for m in range(3)}) == 3
    assert checkpoint_key(parse_args([*train, "--soup", "2"]), info, 1) == checkpoint_key(three, info, 1)
    assert member_dir("ck", 0).as_posix() == "ck" and member_dir("ck", 2).as_posix() == "ck/member-3"
    with pytest.raises(TrainingError, match="soup must be at least 1"):
        parse_args([*train, "--soup", "0"])
    with pytest.raises(TrainingError, match="it needs --pretrained and one of resnet18, resnet34, efficientnet_lite0"):
        parse_args([*train, "--architecture", "resnet10", "--soup", "2"])
    # an architecture without weights is named before any data is decoded, not after
    with pytest.raises(TrainingError, match="no pretrained weights exist for resnet10; .* or --pretrained false"):
        parse_args([*train, "--architecture", "resnet10", "--soup", "2", "--pretrained", "true"])
    with pytest.raises(TrainingError, match="use one of them"):
        parse_args([*train, "--soup", "2", "--linear-probe-c", "0.3", "--wise-alpha", "0.5"])


def test_probe_and_interpolation_need_pretrained_weights_and_valid_values():
    from conftest import DATA_224

    from training_job.train import TrainingError, parse_args

    train = ["--train", str(DATA_224 / "train")]
    cpu = parse_args(train)
    assert (cpu.linear_probe_c, cpu.wise_alpha) == (0.0, 1.0)  # measured, not adopted (recipes.py)
    probed = parse_args([*train, "--linear-probe-c", "0.3", "--wise-alpha", "0.5"])
    assert (probed.pretrained, probed.linear_probe_c, probed.wise_alpha) == (True, 0.3, 0.5)
    with pytest.raises(TrainingError, match="need --pretrained"):
        parse_args([*train, "--architecture", "resnet10", "--wise-alpha", "0.5"])
    with pytest.raises(TrainingError, match="wise-alpha below 1 needs --linear-probe-c"):
        parse_args([*train, "--wise-alpha", "0.5"])
    with pytest.raises(TrainingError, match="linear-probe-c must be positive"):
        parse_args([*train, "--linear-probe-c", "nan"])
    with pytest.raises(TrainingError, match=r"wise-alpha must be in \(0, 1\]"):
        parse_args([*train, "--wise-alpha", "0"])
    with pytest.raises(TrainingError, match="linear-probe-c must be positive"):
        parse_args([*train, "--linear-probe-c", "-1"])


def test_interpolation_weight_is_left_out_of_the_checkpoint_key():
    from conftest import DATA_224

    from training_job.train import checkpoint_key, parse_args

    info = {"fingerprint": "f"}
    probed = ["--train", str(DATA_224 / "train"), "--linear-probe-c", "0.3"]
    base = parse_args(probed)
    other_alpha = parse_args([*probed, "--wise-alpha", "0.8"])
    other_probe = parse_args([*probed, "--linear-probe-c", "0.05"])
    assert checkpoint_key(base, info) == checkpoint_key(other_alpha, info)
    assert checkpoint_key(base, info) != checkpoint_key(other_probe, info)


def test_backbone_learns_at_its_share_of_the_rate_through_the_whole_schedule():
    from types import SimpleNamespace

    from training_job.engine import make_schedule, parameter_groups

    model = build_model("resnet10", width=8)
    head, rest = parameter_groups(model, 1e-3, 0.1)
    assert head["lr"] == pytest.approx(1e-3) and rest["lr"] == pytest.approx(1e-4)
    ids = [id(q) for g in (head, rest) for q in g["params"]]
    assert sorted(ids) == sorted(id(q) for q in model.parameters())  # every parameter once
    assert {id(q) for q in head["params"]} == {id(model.head.weight), id(model.head.bias)}
    assert len(parameter_groups(model, 1e-3, 1.0)) == 1
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="backbone_lr_scale"):
            parameter_groups(model, 1e-3, bad)

    args = SimpleNamespace(epochs=2, lr=1e-3, scheduler="onecycle", warmup_epochs=0)
    opt = torch.optim.AdamW(parameter_groups(model, 1e-3, 0.1), lr=1e-3)
    sched = make_schedule(args, opt, steps_per_epoch=10)
    peaks = [0.0, 0.0]
    for _ in range(20):
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs[1] == pytest.approx(0.1 * lrs[0])
        peaks = [max(p, x) for p, x in zip(peaks, lrs, strict=True)]
        opt.step()
        sched.step()
    assert peaks == [pytest.approx(1e-3), pytest.approx(1e-4)]


def test_backbone_rate_needs_pretrained_weights_and_keeps_earlier_checkpoint_keys():
    from conftest import DATA_224

    from training_job.train import TrainingError, checkpoint_key, parse_args

    train = ["--train", str(DATA_224 / "train")]
    assert parse_args(train).backbone_lr_scale == 1.0
    assert parse_args([*train, "--backbone-lr-scale", "0.1"]).backbone_lr_scale == 0.1
    with pytest.raises(TrainingError, match="needs --pretrained"):
        parse_args([*train, "--architecture", "resnet10", "--backbone-lr-scale", "0.1"])
    for bad in ("0", "2", "nan"):
        with pytest.raises(TrainingError, match=r"backbone-lr-scale must be in \(0, 1\]"):
            parse_args([*train, "--backbone-lr-scale", bad])
    info = {"fingerprint": "f"}
    default = parse_args(train)
    before = parse_args(train)
    del before.backbone_lr_scale  # a run from before the option existed
    assert checkpoint_key(default, info) == checkpoint_key(before, info)
    slower = parse_args([*train, "--backbone-lr-scale", "0.5"])
    assert checkpoint_key(default, info) != checkpoint_key(slower, info)


def test_the_optimizer_training_builds_gives_the_backbone_its_share_of_the_rate():
    from conftest import DATA_224

    from training_job.engine import make_optimizer
    from training_job.train import parse_args

    train = ["--train", str(DATA_224 / "train"), "--lr", "2e-3", "--weight-decay", "0.01"]
    model = build_model("efficientnet_lite0", pretrained=False, image_size=64)
    slower = make_optimizer(parse_args([*train, "--backbone-lr-scale", "0.25"]), model)
    assert type(slower) is torch.optim.AdamW
    assert [g["lr"] for g in slower.param_groups] == [pytest.approx(2e-3), pytest.approx(5e-4)]
    assert [g["weight_decay"] for g in slower.param_groups] == [0.01, 0.01]
    assert sum(len(g["params"]) for g in slower.param_groups) == len(list(model.parameters()))
    one = make_optimizer(parse_args([*train, "--optimizer", "adam"]), model)
    assert type(one) is torch.optim.Adam and len(one.param_groups) == 1


def test_test_time_views_average_the_network_over_the_image_its_mirror_and_shrunk_copies():
    import torch.nn.functional as F

    from training_job.models import TestTimeViews, with_test_time_views

    torch.manual_seed(0)
    net = build_model("seed_cnn", 1, 2, width=8).eval()
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        logits, fmap = TestTimeViews(net, 64, hflip=True, zoom_out=(1.25,)).forward_with_features(x)
        # A copy shrunk by 1.25: the image in the middle 64/1.25 = 51.2 px, its border pixels around it.
        grid = F.affine_grid(torch.tensor([[[1.25, 0, 0], [0, 1.25, 0]]]).expand(3, 2, 3), [3, 1, 64, 64],
                             align_corners=False)
        shrunk = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
        expected = (net(x) + net(x.flip(3)) + net(shrunk)) / 3
        assert torch.allclose(logits, expected, atol=1e-6)
        assert torch.equal(fmap, net.forward_with_features(x)[1])  # heatmap and refusal check: the image itself
        # The frame around the shrunk image repeats the image's edge: its corner is the image's corner.
        assert torch.allclose(shrunk[:, :, 0, 0], x[:, :, 0, 0]) and torch.allclose(shrunk[:, :, -1, -1], x[:, :, -1, -1])
    assert with_test_time_views(net, 64) is net
    with pytest.raises(ValueError, match="above 1 and at most 2"):
        TestTimeViews(net, 64, zoom_out=(0.8,))


def test_test_time_views_stay_out_of_the_checkpoint_key():
    from conftest import DATA_224

    from training_job.train import checkpoint_key, parse_args

    info = {"fingerprint": "f"}
    train = ["--train", str(DATA_224 / "train")]
    plain = parse_args(train)
    assert checkpoint_key(plain, info) == checkpoint_key(parse_args([*train, "--tta", "--tta-zoom-out", "1.2"]), info)
    before = parse_args(train)
    del before.tta_zoom_out  # a run from before the option existed
    assert checkpoint_key(plain, info) == checkpoint_key(before, info)
    # A scale range is a training choice: it changes the key; left to the preset, the key is the
    # one of runs from before the option existed.
    scaled = parse_args([*train, "--augment-scale", "0.6,1.0"])
    assert scaled.augment_scale == (0.6, 1.0) and checkpoint_key(plain, info) != checkpoint_key(scaled, info)
    preset, older = parse_args([*train, "--augment-scale", "preset"]), parse_args(train)
    assert preset.augment_scale is None
    del older.augment_scale
    assert checkpoint_key(preset, info) == checkpoint_key(older, info)
    # Without augmentation the range is unused: it does not change the key.
    bare = parse_args([*train, "--augment", "none"])
    assert checkpoint_key(bare, info) == checkpoint_key(parse_args([*train, "--augment", "none", "--augment-scale",
                                                                     "0.6,1.0"]), info)
    del bare.augment_scale
    assert checkpoint_key(bare, info) == checkpoint_key(parse_args([*train, "--augment", "none"]), info)
    assert checkpoint_key(plain, info) != checkpoint_key(parse_args([*train, "--epochs", "3"]), info)
