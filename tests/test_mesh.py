"""Multislice meshes: slices over the data-centre network, everything else inside a slice."""

from __future__ import annotations

import dataclasses
import random

import jax
import numpy as np
import pytest

from flanjax.sharding import MeshConfig, MeshError, device_grid, make_mesh


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """What mesh building reads of a TPU device of one slice of a multislice job."""

    id: int
    slice_index: int
    process_index: int = 0
    platform: str = "cpu"
    device_kind: str = "fake"


def devices(num_slices: int, per_slice: int, shuffle: bool = True) -> list[FakeDevice]:
    found = [FakeDevice(s * per_slice + i, s, process_index=s) for s in range(num_slices) for i in range(per_slice)]
    if shuffle:  # jax.devices() need not list them slice by slice
        random.Random(0).shuffle(found)
    return found


def slice_of(grid: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda d: d.slice_index)(grid)


def assert_slices_are_contiguous_blocks(grid: np.ndarray, num_slices: int, block: tuple[int, ...]):
    slices = slice_of(grid)
    for s in range(num_slices):
        where = np.argwhere(slices == s)
        lo, hi = where.min(0), where.max(0) + 1
        assert tuple(hi - lo) == block and np.all(slices[tuple(slice(a, b) for a, b in zip(lo, hi))] == s)


def test_data_parallelism_across_slices_fsdp_inside():
    config = MeshConfig(data=1, fsdp=-1, tensor=2, dcn_data=4)
    grid = device_grid(config, devices(4, 8))
    assert grid.shape == config.resolve(32) == (4, 4, 2)
    assert slice_of(grid)[:, 0, 0].tolist() == [0, 1, 2, 3]  # the data axis walks the slices, in order
    assert_slices_are_contiguous_blocks(grid, 4, (1, 4, 2))
    for s in range(4):  # inside a slice, all of its devices (on TPUs, in their physical order)
        assert sorted(d.id for d in grid[s].ravel()) == list(range(8 * s, 8 * s + 8))


def test_fsdp_across_slices_keeps_each_slice_whole():
    config = MeshConfig(data=2, fsdp=2, tensor=1, dcn_data=1, dcn_fsdp=2)
    grid = device_grid(config, devices(2, 4))
    assert grid.shape == (2, 4, 1)
    assert slice_of(grid)[0, :, 0].tolist() == [0, 0, 1, 1]
    assert_slices_are_contiguous_blocks(grid, 2, (2, 2, 1))


def test_one_slice_is_the_plain_mesh():
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": jax.device_count() // 2, "tensor": 1}


@pytest.mark.parametrize(
    "config, found, message",
    [
        (MeshConfig(data=1, fsdp=-1, dcn_data=2), devices(3, 4), "asks for dcn_data x dcn_fsdp = 2 slices, but the devices form 3"),
        (MeshConfig(data=1, fsdp=-1, dcn_data=3), devices(2, 4), "do not split into dcn_data x dcn_fsdp = 3 equal slices"),
        (MeshConfig(data=1, fsdp=3, dcn_data=2), devices(2, 4), "does not divide the 4 available devices"),
        (MeshConfig(data=1, fsdp=-1, dcn_data=0), devices(2, 4), "slice counts must be positive"),
    ],
)
def test_a_mesh_that_does_not_fit_the_slices_is_refused(config, found, message):
    with pytest.raises(MeshError, match=message):
        device_grid(config, found)


def test_devices_without_slices_count_processes():
    with pytest.raises(MeshError, match=r"the devices form 1 \(counted by process\)"):
        make_mesh(MeshConfig(data=1, fsdp=-1, dcn_data=2))
