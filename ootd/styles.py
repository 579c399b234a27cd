"""The style vocabulary and garment classes shared by data, training and serving."""

# The 13 Musinsa street-snap styles the original team worked with (DESIGN §1).
STYLES: tuple[str, ...] = (
    "Casual",
    "Chic",
    "Cityboy",
    "Classic",
    "Girlish",
    "Gorpcore",
    "Minimal",
    "Preppy",
    "Retro",
    "Romantic",
    "Sporty",
    "Street",
    "Workwear",
)

# K-Fashion's four primary garment classes; YOLO class ids are their positions here.
GARMENT_CLASSES: tuple[str, ...] = ("top", "bottom", "outer", "dress")
