import torch
from torch.utils.flop_counter import FlopCounterMode
from moetx import MeshDegrees, Pipeline, ContextParallel, ExpertParallel, ParallelMesh
from moetx.planning import predict
from moetx.testing import fake_world
from moetx.testing.train import TrainSpec, build_model, global_batches
from tests.test_autoplan import TP_CONFIG, MODES, _ac
from tests.test_predict_flops import UNCOUNTED
from tests.bodies.autoplan import _batch
spec = TrainSpec(config=TP_CONFIG, steps=1, rows_per_rank=2, seq_len=16)
for first, deg in ((ContextParallel(), MeshDegrees(cp=2)), (ContextParallel(comm="p2p"), MeshDegrees(cp=2))):
  for mode in MODES:
    pipe = Pipeline((first, *_ac(mode)))
    pred = predict(TP_CONFIG, deg, pipe, seq=16, micro_batch=2).flops
    with fake_world(2, 1):
        mesh = ParallelMesh.build(cp=2, device_type="cpu")
        model = pipe.apply(build_model(spec), mesh)
        batch = _batch(spec, pipe, deg)
        with FlopCounterMode(display=False, custom_mapping=UNCOUNTED) as c:
            model(**batch).loss.backward()
    print(first, mode, pred, c.get_total_flops(), pred - c.get_total_flops())
