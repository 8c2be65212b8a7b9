"""Generic captions for the preserved-key statistics C₀ = E[k kᵀ] of EMCID.

EMCID (like MEMIT) keeps everything it does not edit by weighting the closed-form solve with the
second moment of the text encoder's fc2 inputs over ordinary text. The paper uses ~100k tokens of
real captions; we cannot ship a caption corpus, so we generate one deterministically from a small
hand-written vocabulary of everyday subjects, attributes, actions, scenes and photo styles, and —
as real prompts have them, and as the concepts users edit most often are — people's names,
artists and art styles. The same seed always yields the same captions, so C₀ caches stay valid
across runs and machines.
"""
from __future__ import annotations

import random

SUBJECTS = (
    "dog", "cat", "horse", "bird", "fish", "cow", "sheep", "lion", "tiger", "bear", "elephant", "rabbit",
    "fox", "wolf", "deer", "owl", "eagle", "duck", "frog", "turtle", "butterfly", "bee", "man", "woman",
    "child", "girl", "boy", "old man", "old woman", "family", "couple", "chef", "doctor", "farmer",
    "soldier", "musician", "dancer", "student", "teacher", "king", "queen", "knight", "robot", "car",
    "truck", "bus", "bicycle", "motorcycle", "train", "airplane", "boat", "ship", "house", "castle",
    "bridge", "tower", "church", "lighthouse", "tree", "flower", "rose", "sunflower", "mountain", "river",
    "lake", "beach", "forest", "city", "street", "road", "garden", "field", "desert", "island", "chair",
    "table", "sofa", "bed", "lamp", "clock", "book", "cup", "bottle", "vase", "bowl", "plate", "guitar",
    "piano", "violin", "camera", "phone", "computer", "umbrella", "hat", "shoe", "bag", "ball", "kite",
    "apple", "banana", "orange", "pizza", "cake", "sandwich", "bread", "coffee", "salad", "soup",
    "building", "window", "door", "fence", "statue", "fountain", "cloud", "moon", "sun", "star", "candle",
    "circle", "square", "triangle", "cross", "heart",
)
ATTRIBUTES = (
    "red", "blue", "green", "yellow", "white", "black", "brown", "grey", "pink", "purple", "orange",
    "golden", "silver", "small", "large", "tiny", "huge", "old", "new", "young", "ancient", "modern",
    "wooden", "metal", "glass", "stone", "shiny", "dusty", "wet", "dry", "happy", "sad", "sleeping",
    "running", "smiling", "colorful", "dark", "bright", "beautiful", "strange", "cute", "tall", "short",
    "broken", "empty", "crowded", "quiet", "famous", "simple", "fancy",
)
ACTIONS = (
    "standing", "sitting", "walking", "running", "lying", "jumping", "flying", "swimming", "eating",
    "reading", "playing", "waiting", "looking out", "resting", "floating", "parked", "hanging",
)
PLACES = (
    "in a park", "on a beach", "in the snow", "in the rain", "at night", "at sunset", "in a forest",
    "on a street", "in a kitchen", "in a living room", "on a table", "in a field", "by the sea",
    "in the mountains", "in a city", "in a garden", "under a tree", "on a bridge", "in a room",
    "near a river", "in the desert", "on a hill", "in front of a house", "at the market",
    "in a museum", "on the grass", "in the sky", "underwater", "in a studio", "on a road",
)
STYLES = (
    "a photo of", "a picture of", "an image of", "a painting of", "a drawing of", "a sketch of",
    "a close-up photo of", "a black and white photo of", "a watercolor of", "an illustration of",
    "a 3d render of", "a cartoon of", "a photograph of", "a blurry photo of", "an oil painting of",
)
SUFFIXES = (
    "", "", "", ", high quality", ", detailed", ", 4k", ", film grain", ", soft light", ", wide angle",
    ", digital art", ", trending on artstation", ", studio lighting",
)


NAMES = (
    "John", "Maria", "Ahmed", "Yuki", "Olga", "Carlos", "Priya", "Chen", "Fatima", "Lucas", "Amara", "Ivan",
    "Sofia", "Kwame", "Emma", "Hiroshi", "Aisha", "Liam", "Mei", "Diego", "Abraham Lincoln", "Albert Einstein",
    "Marie Curie", "Cleopatra", "Napoleon", "William Shakespeare", "Charles Darwin", "Queen Victoria",
    "Julius Caesar", "Mahatma Gandhi", "Isaac Newton", "Joan of Arc", "Genghis Khan", "Mozart",
)
ARTISTS = (
    "Vincent van Gogh", "Claude Monet", "Pablo Picasso", "Rembrandt", "Leonardo da Vinci", "Salvador Dali",
    "Frida Kahlo", "Katsushika Hokusai", "Andy Warhol", "Gustav Klimt", "Edvard Munch", "Johannes Vermeer",
    "Michelangelo", "Henri Matisse", "Piet Mondrian", "Georgia O'Keeffe", "Caravaggio", "J. M. W. Turner",
    "Paul Cezanne", "Wassily Kandinsky", "Edward Hopper", "Alphonse Mucha", "Sandro Botticelli", "Paul Gauguin",
    "Hieronymus Bosch", "Rene Magritte", "Egon Schiele", "Joan Miro", "Albrecht Durer", "Titian",
)
ART_STYLES = (
    "impressionist", "cubist", "surrealist", "baroque", "renaissance", "art nouveau", "pop art", "ukiyo-e",
    "anime", "pixel art", "abstract", "minimalist", "gothic", "steampunk", "cyberpunk", "expressionist",
    "pointillist", "realist", "art deco", "low poly", "photorealistic", "romantic", "fauvist", "manga",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def generic_captions(n: int = 2000, seed: int = 0) -> list[str]:
    """`n` deterministic, varied captions (about 8-16 CLIP tokens each): everyday scenes, and about a
    third with a person's name, an artist or an art style."""
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        subj = rng.choice(SUBJECTS)
        form = rng.random()
        if form < 0.25:
            attr = rng.choice(ATTRIBUTES)
            text = f"{rng.choice(STYLES)} {_article(attr)} {attr} {subj} {rng.choice(PLACES)}"
        elif form < 0.42:
            text = f"{_article(subj)} {subj} {rng.choice(ACTIONS)} {rng.choice(PLACES)}"
        elif form < 0.55:
            other = rng.choice(SUBJECTS)
            text = f"{_article(subj)} {subj} and {_article(other)} {other} {rng.choice(PLACES)}"
        elif form < 0.65:
            attr = rng.choice(ATTRIBUTES)
            text = f"{attr} {subj}, {rng.choice(STYLES)} {rng.choice(SUBJECTS)}"
        elif form < 0.75:  # a person by name
            name = rng.choice(NAMES)
            text = rng.choice((f"a portrait of {name}", f"{name} {rng.choice(ACTIONS)} {rng.choice(PLACES)}",
                               f"a photo of {name} with {_article(subj)} {subj}"))
        elif form < 0.88:  # an artist
            artist = rng.choice(ARTISTS)
            text = rng.choice((f"{rng.choice(STYLES)} {_article(subj)} {subj} by {artist}",
                               f"{_article(subj)} {subj} in the style of {artist}",
                               f"{subj} {rng.choice(PLACES)}, painted by {artist}"))
        else:  # an art style
            art = rng.choice(ART_STYLES)
            text = rng.choice((f"{_article(art)} {art} painting of {_article(subj)} {subj}",
                               f"{_article(subj)} {subj} {rng.choice(PLACES)}, {art} style",
                               f"{art} art of {_article(subj)} {subj}"))
        text += rng.choice(SUFFIXES)
        if text not in seen or len(seen) > 50 * n:  # duplicates only once the space is exhausted
            seen.add(text)
            out.append(text)
    return out
