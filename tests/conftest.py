import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def test_model_dir(tmp_path_factory):
    from tests.helpers import save_test_model

    return save_test_model(tmp_path_factory.mktemp("models") / "wan")


@pytest.fixture(scope="session")
def test_dataset_dir(tmp_path_factory):
    from tests.helpers import save_test_dataset

    return save_test_dataset(tmp_path_factory.mktemp("data") / "ds", num_samples=16)


@pytest.fixture(scope="session")
def single_process_world():
    """A one-process torch.distributed world (gloo) for tests that build DeepSpeed engines."""
    from megadmd.parallel.init import init_distributed

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    return init_distributed("gloo")
