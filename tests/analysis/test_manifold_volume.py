"""Manifold check: volumes rise monotonically and slowly with the scale; PLY/NPY readers."""
import numpy as np
import pytest

import pml_dsb
from pml_dsb.analysis import (
    BUILTIN_CLOUDS,
    DEFAULT_FACTORS,
    builtin_point_cloud,
    load_point_cloud,
    read_ply,
    scaled_volumes,
    volume_report,
)


@pytest.mark.parametrize("name", BUILTIN_CLOUDS)
def test_builtin_clouds_monotonic_and_slow(name):
    points = builtin_point_cloud(name, n_samples=300, seed=0)
    volumes = scaled_volumes(points, DEFAULT_FACTORS)
    report = volume_report(DEFAULT_FACTORS, volumes)
    assert report["monotonic"] and np.all(np.diff(volumes) > 0)
    assert report["slow"] and report["max_bits_per_doubling"] <= 3.0
    assert report["sublinear"]  # coordinates of order 1-10: the logarithmic regime


def test_volume_uses_unnormalized_points_and_is_translation_invariant():
    points = np.random.default_rng(1).normal(size=(100, 3))
    v = scaled_volumes(points + 5.0, [2.0])[0]
    import torch

    assert v == pytest.approx(float(pml_dsb.semantic_scale(torch.as_tensor(points * 2.0), normalize=False)))
    # with L2 normalisation every scaled copy would give the same value
    assert scaled_volumes(points, [1.0])[0] != pytest.approx(scaled_volumes(points, [4.0])[0])


def test_small_cloud_is_monotonic_but_not_sublinear():
    points = np.random.default_rng(2).normal(size=(200, 3)) * 0.05  # e.g. a cloud in metres
    report = volume_report(DEFAULT_FACTORS, scaled_volumes(points))
    assert report["monotonic"] and report["slow"] and not report["sublinear"]


PLY_HEADER = (
    "ply\nformat ascii 1.0\ncomment made by a test\nelement vertex {n}\nproperty float x\n"
    "property float y\nproperty float z\nproperty float nx\nelement face 1\n"
    "property list uchar int vertex_indices\nend_header\n"
)


def test_ascii_ply_and_npy(tmp_path):
    pts = np.random.default_rng(3).normal(size=(6, 3))
    body = "".join(f"{x} {y} {z} 0.5\n" for x, y, z in pts) + "3 0 1 2\n"
    ply = tmp_path / "cloud.ply"
    ply.write_text(PLY_HEADER.format(n=6) + body)
    np.testing.assert_allclose(read_ply(ply), pts, rtol=1e-12)
    np.save(tmp_path / "cloud.npy", pts)
    np.testing.assert_array_equal(load_point_cloud(tmp_path / "cloud.npy"), pts)
    np.testing.assert_allclose(load_point_cloud(ply), pts, rtol=1e-12)


def test_bad_point_clouds(tmp_path):
    binary = tmp_path / "bin.ply"
    binary.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 1\nproperty float x\n"
                       b"property float y\nproperty float z\nend_header\n" + b"\x00" * 12)
    with pytest.raises(ValueError, match="binary_little_endian PLY.*only ASCII"):
        read_ply(binary)
    short = tmp_path / "short.ply"
    short.write_text(PLY_HEADER.format(n=4) + "0 0 0 0\n")
    with pytest.raises(ValueError, match="declares 4 vertices"):
        read_ply(short)
    np.save(tmp_path / "flat.npy", np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        load_point_cloud(tmp_path / "flat.npy")
    with pytest.raises(ValueError, match=".npy or .ply"):
        load_point_cloud(tmp_path / "cloud.xyz")
    with pytest.raises(ValueError, match="factors"):
        scaled_volumes(np.zeros((3, 3)), [1.0, -2.0])
    # a repeated factor made a zero step in log2 f: NaN rates and a false "NOT monotonic"
    with pytest.raises(ValueError, match=r"factors must be distinct, got \[1.0, 1.0, 2.0\]"):
        volume_report([1, 1, 2], [3.0, 3.0, 4.5])
    for factors in ([0.0, 1.0], [-1.0, 1.0], [1.0, float("inf")]):  # log2 f: LAPACK noise, then LinAlgError
        with pytest.raises(ValueError, match="factors must be positive and finite"):
            volume_report(factors, [3.0, 4.0])


def test_ply_header_without_data_or_format_is_named(tmp_path):
    # both raised IndexError, which the CLI printed as a traceback
    truncated = tmp_path / "trunc.ply"
    truncated.write_bytes(PLY_HEADER.format(n=1).rstrip("\n").encode())
    with pytest.raises(ValueError, match="ends at 'end_header': no vertex data"):
        read_ply(truncated)
    bare = tmp_path / "bare.ply"
    bare.write_text(PLY_HEADER.format(n=1).replace("format ascii 1.0", "format") + "0 0 0\n")
    with pytest.raises(ValueError, match="names no format in its PLY header"):
        read_ply(bare)
    for line in ("element vertex", "element", "element vertex -1"):
        bare.write_text(PLY_HEADER.format(n=1).replace("element vertex 1", line) + "0 0 0\n")
        with pytest.raises(ValueError, match=f"malformed PLY header line '{line}'"):
            read_ply(bare)


def test_ply_elements_before_vertex_are_skipped(tmp_path):
    """The lines of an element declared before ``vertex`` (here ``face``) must be
    skipped: reading from the first body line took face lines as vertices."""
    pts = np.random.default_rng(5).normal(size=(4, 3))
    # two 3-token face lines (list of 2 indices): read as vertices they would parse without an error
    header = ("ply\nformat ascii 1.0\nelement face 2\nproperty list uchar int vertex_indices\n"
              "element vertex 4\nproperty double x\nproperty double y\nproperty double z\nend_header\n")
    body = "2 0 1\n2 2 3\n" + "".join(f"{x!r} {y!r} {z!r}\n" for x, y, z in pts.tolist())
    ply = tmp_path / "face_first.ply"
    ply.write_text(header + body)
    np.testing.assert_array_equal(read_ply(ply), pts)


def test_volume_report_sorts_unsorted_factors():
    """Factors given out of order must be sorted with their volumes: in the given
    order [2, 1, 4] the volumes [12.9, 10, 15.9] looked not monotonic and the
    factor ratio 4 / 2 instead of 4 / 1."""
    report = volume_report([2, 1, 4], [12.9, 10.0, 15.9])
    assert report["monotonic"] is True and report["slow"] is True
    assert report["factor_ratio"] == 4.0
    assert report["volume_ratio"] == pytest.approx(15.9 / 10.0)
    assert report["max_bits_per_doubling"] == pytest.approx(3.0)  # (15.9 - 12.9) / (log2 4 - log2 2)
    assert report["bits_per_doubling"] == pytest.approx(np.polyfit([0.0, 1.0, 2.0], [10.0, 12.9, 15.9], 1)[0])
    assert report == volume_report([1, 2, 4], [10.0, 12.9, 15.9])


def test_a_plateau_is_not_monotonic():
    """"monotonic" means strictly increasing: equal volumes at two factors are not."""
    from pml_dsb.analysis.manifold import volume_report

    assert volume_report([1, 2, 4], [1.0, 1.0, 2.0])["monotonic"] is False
    assert volume_report([1, 2, 4], [1.0, 1.0 + 1e-9, 2.0])["monotonic"] is True
