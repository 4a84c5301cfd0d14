"""Documents to Markdown and JSON: PDF/image pages -> PP-DocLayoutV3 regions -> GLM-OCR recognition
of every region in one engine -> the glmocr SDK's Markdown and JSON (`glmrt parse`)."""

# The layout checkpoint (glmocr SDK's config.yaml `pipeline.layout.model_dir`), named here rather
# than in layout.py so that the CLI's --help shows it without importing torch.
DEFAULT_LAYOUT_MODEL = "PaddlePaddle/PP-DocLayoutV3_safetensors"
