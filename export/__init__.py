"""Run directory -> serving artifacts (docs/artifacts.md): ONNX models behind a parity gate.

    wrappers.py  tensor-only modules that are exported     onnx.py     export, fp16 conversion
    parity.py    the gate against PyTorch                  run.py      `mp4sr-rt export`
    tensorrt.py  engines (--trt)                           triton.py   model repository (--triton)
"""
