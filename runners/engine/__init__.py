"""The engine: what every front end calls (docs/engine.md). One loaded model behind one typed call
per mode; front ends build the requests below and show the results.

    model = load_model("faces.yml")
    engine = Engine(model, EngineOptions(cache_root=latent_cache_root(None)))
    engine.run(EditJob(Inverting(400, 40), Path("imgs/face_example.png"),
                       EditRequest((Move("Smiling", -10, 10),), Denoising(40), k=7), Path("boundary")),
               exp=Path("runs/demo"))

The front ends import only the names of ``__all__`` (tests/test_engine_imports.py checks it).
"""
from models import build_model
from models.checkpoints import default_cache_dir
from models.loading import LoadedModel, load_model
from models.runtime import PRECISIONS, InferenceNet, cpu_flags, default_batch_size, pick_device, retain_freed_memory
from runners.engine.boundaries import AUTO_SCALE, BoundaryIndex, auto_span, fitted_t_0, relative_scale
from runners.engine.describe import MAX_HOLD_RATIO, EditDescription
from runners.engine.discover import DiscoverJob, factor_matches
from runners.engine.editor import Editor, differentiable_net
from runners.engine.engine import Engine, EngineOptions, OneEdit, RunResult, check_job, latent_cache_root
from runners.engine.outputs import edit_file_names
from runners.engine.search import plan_search
from runners.engine.outputs import outline as outline_region
from runners.engine.sessions import server_folder
from runners.engine.t0_report import recommend_t0, t0_report
from runners.engine.requests import (MAX_ATTRIBUTES, MAX_DISTANCE, MAX_EDITS, MAX_POINTS, REGION_H, UNITS, Denoising,
                                     EditJob, EditLimits, EditRequest, Inverting, Move, RadiusJob, Region, SampleJob,
                                     SearchJob, check_request, check_steps, spaced)
from utils.config import Config, latent_shapes, load_config, parse_config
from utils.core.atlas import HOLD_THRESHOLD
from utils.core.gram import SVM_C_RANGE
from utils.core.diffusion import H_POLICIES, Inversion
from utils.core.seeds import EVALUATION_NOISE, image_key, item_seed
from utils.core.boundary import class_summary, fit_boundary
from utils.core.spaces import MOVED, SPACES
from utils.distributed import ProcessContext, local_device, process_group
from utils.distributed import context_from_env as distributed_process
from utils.errors import UserError
from utils.io.boundary_files import BoundaryRecord, load_boundary, save_boundary
from utils.io.datasets import attribute_table
from utils.io.files import sha256_file

__all__ = [
    # the model
    "Config", "InferenceNet", "LoadedModel", "PRECISIONS", "build_model", "cpu_flags", "default_batch_size",
    "default_cache_dir", "latent_shapes", "load_config", "load_model", "parse_config", "pick_device",
    "retain_freed_memory",
    # where it computes (torchrun: one process per device, docs/distributed.md)
    "ProcessContext", "distributed_process", "local_device", "process_group",
    # the engine and its results
    "Editor", "Engine", "EngineOptions", "EditDescription", "Inversion", "OneEdit", "RunResult",
    "check_job", "edit_file_names", "latent_cache_root", "outline_region", "server_folder",
    # the seed rule (utils/core/seeds.py): every edit's noise from (seed, image key, iteration, k)
    "EVALUATION_NOISE", "image_key", "item_seed",
    # data sets and files; a boundary search's images, labels and split
    "attribute_table", "plan_search", "sha256_file",
    # requests
    "Denoising", "EditJob", "EditLimits", "EditRequest", "Inverting", "Move", "RadiusJob", "Region", "REGION_H",
    "SampleJob", "SearchJob",
    "check_request", "check_steps", "spaced",
    # boundaries, units and limits
    "AUTO_SCALE", "BoundaryIndex", "H_POLICIES", "HOLD_THRESHOLD", "MAX_ATTRIBUTES", "MAX_DISTANCE", "MAX_EDITS",
    "BoundaryRecord", "class_summary", "fit_boundary", "load_boundary", "save_boundary",
    "MAX_HOLD_RATIO", "MAX_POINTS", "MOVED", "SVM_C_RANGE", "SPACES", "UNITS", "auto_span", "fitted_t_0", "relative_scale",
    # directions without labels (--discover), the faces' naming of them, which t_0
    "DiscoverJob", "differentiable_net", "factor_matches", "recommend_t0", "t0_report",
    # errors
    "UserError",
]
