"""The VideoDiT: embeddings, blocks, the SPRINT encoder/middle/decoder layout, presets."""
