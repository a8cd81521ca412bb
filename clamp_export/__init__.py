"""clamp-export: data-free CLAMP-ViT quantization of timm ViTs, exported for deployment."""

__version__ = "0.1.0"
