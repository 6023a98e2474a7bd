"""diffss serving: the exported ONNX model repository over the Open Inference Protocol (KServe v2 REST).

Imports numpy, onnxruntime, PIL and fastapi/uvicorn only (never torch), so the serving image
stays slim. Entry point: ``diffss-serve --model-repository PATH`` (``deploy.server:main``).
"""
