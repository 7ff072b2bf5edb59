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


TRAINED_RUN_OVERRIDES = ["train.max_steps=4", "checkpoint.interval_steps=2", "checkpoint.keep_last=0",
                         "dmd.generator_update_interval=2", "ema.decay=0.5", "train.micro_batch_size=2",
                         "logging.tensorboard=false", "logging.interval_steps=2"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, test_model_dir, test_dataset_dir, single_process_world):
    """A finished tiny run (checkpoints at steps 2 and 4, with an EMA) and the overrides that made
    it; tests copy it before changing anything."""
    from megadmd.config import resolve
    from megadmd.runner import run_train

    out = tmp_path_factory.mktemp("trained") / "run"
    overrides = [f"model.teacher_path={test_model_dir}", f"data.path={test_dataset_dir}", *TRAINED_RUN_OVERRIDES]
    run_train(resolve(overrides=[f"output_dir={out}", *overrides]))
    return out, overrides


# The slowest files, started first. Under xdist (setup.cfg: a file per worker) files are handed
# out in collection order, so a long file collected late becomes the suite's tail on one worker
# while the other idles: the default job (300 iterations) alone is several minutes.
SLOW_FILES_FIRST = ("tests/e2e/test_quality.py", "tests/e2e/test_data_pipeline.py", "tests/e2e/test_gpu_check.py",
                    "tests/e2e/test_train_cli.py", "tests/e2e/test_lora_e2e.py", "tests/e2e/test_checkpoint.py",
                    "tests/distributed/test_ulysses.py", "tests/e2e/test_convert_generate.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.split("::")[0]
        return SLOW_FILES_FIRST.index(path) if path in SLOW_FILES_FIRST else len(SLOW_FILES_FIRST)

    items.sort(key=rank)  # stable: the tests of a file keep their order
