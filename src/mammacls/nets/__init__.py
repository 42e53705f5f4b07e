"""The networks (torch): architectures built from their specs, ImageNet weights, the lesion decoder,
Grad-CAM, saving and loading weights, ONNX export."""
