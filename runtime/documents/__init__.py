"""Documents to Markdown and JSON: PDF/image pages -> PP-DocLayoutV3 regions -> GLM-OCR recognition
of every region in one engine -> the glmocr SDK's Markdown and JSON (`glmrt parse`)."""
