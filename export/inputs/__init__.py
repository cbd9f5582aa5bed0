"""What the user hands us besides the checkpoint, read and checked before any stage uses it: sample images
(letterboxed as ultralytics predicts), image sizes, labelled datasets. Siblings of export.checkpoint."""
