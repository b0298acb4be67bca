"""PyTorch → ONNX export of the text encoder, VAE and UNet (whole and segmented)."""
