"""Which installed files the photo tasks use: the photographs of each wallpaper package and the tuxpaint categories.

Wallpaper packages mix photographs with renders, gradients and logos; only the photographs are
listed. Each entry says whether the photo may be a counting background: photos that show animals,
fruit, flowers or shapes of their own are not, since a count label is the number of pasted cut-outs
and should also be what a viewer counts. Entries missing on a machine are skipped.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class CutoutCategory:
    """A countable category: the noun used in its query and the tuxpaint folders that hold it."""

    # Plural noun in the query: "Sort images by the number of {noun}."
    noun: str
    # Folders under usr/share/tuxpaint/stamps (not recursive; cartoon sub-folders are skipped).
    folders: tuple[str, ...]


# Photographs (not renders or logos) of each wallpaper package, by path under the root.
# Flags say whether a photo may be a counting background.
DEBIAN_PHOTOS: dict[str, dict[str, bool]] = {
    "lomiri-wallpapers": {
        "usr/share/backgrounds/Bridge_by_Sander_Klootwijk.jpg": True,
        "usr/share/backgrounds/Dragonfly_by_Bolly.jpg": False,
        "usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg": False,
        "usr/share/backgrounds/Picture_0B_by_freespace.jpg": False,
        "usr/share/backgrounds/Picture_1A_by_freespace.jpg": False,
        "usr/share/backgrounds/Wine_by_Jakkub_Mede.jpg": True,
        "usr/share/backgrounds/aitzgorri_by_Aitzol_Berasategi.jpg": True,
        "usr/share/backgrounds/analogpattern_by_Peter_Nerlich.jpg": True,
        "usr/share/backgrounds/free_by_Peter_Nerlich.jpg": False,
        "usr/share/backgrounds/friends_by_Aitzol_Berasategi.jpg": False,
        "usr/share/backgrounds/greentock_by_Peter_Nerlich.jpg": True,
        "usr/share/backgrounds/life_by_Aitzol_Berasategi.jpg": True,
        "usr/share/backgrounds/picosdeeuropa_by_Aitzol_Berasategi.jpg": True,
        "usr/share/backgrounds/seeding_by_Clements_Engelhardt.jpg": False,
        "usr/share/backgrounds/sunset_by_Aitzol_Berasategi.jpg": True,
    },
    "mate-backgrounds": {
        "usr/share/backgrounds/mate/nature/Aqua.jpg": True,
        "usr/share/backgrounds/mate/nature/Blinds.jpg": True,
        "usr/share/backgrounds/mate/nature/Dune.jpg": True,
        "usr/share/backgrounds/mate/nature/FreshFlower.jpg": False,
        "usr/share/backgrounds/mate/nature/Garden.jpg": False,
        "usr/share/backgrounds/mate/nature/GreenMeadow.jpg": True,
        "usr/share/backgrounds/mate/nature/LadyBird.jpg": False,
        "usr/share/backgrounds/mate/nature/RainDrops.jpg": True,
        "usr/share/backgrounds/mate/nature/Storm.jpg": True,
        "usr/share/backgrounds/mate/nature/TwoWings.jpg": False,
        "usr/share/backgrounds/mate/nature/Wood.jpg": True,
        "usr/share/backgrounds/mate/nature/YellowFlower.jpg": False,
    },
    # Plasma wallpapers are folders with one picture at several resolutions (see _plasma_image).
    "plasma-workspace-wallpapers": {
        "usr/share/wallpapers/BytheWater": True,
        "usr/share/wallpapers/ColdRipple": True,
        "usr/share/wallpapers/ColorfulCups": False,
        "usr/share/wallpapers/DarkestHour": True,
        "usr/share/wallpapers/EveningGlow": True,
        "usr/share/wallpapers/FallenLeaf": True,
        "usr/share/wallpapers/Grey": True,
        "usr/share/wallpapers/Kite": True,
        "usr/share/wallpapers/MilkyWay": False,
        "usr/share/wallpapers/OneStandsOut": True,
        "usr/share/wallpapers/Path": True,
        "usr/share/wallpapers/summer_1am": True,
    },
}

# scikit-image sample photos (names from rankpipe.pipeline.datasets.demo_data.PHOTOS) and whether each may be a
# counting background: not the cat, the coins, the star field or the photos dominated by one object.
SCIKIT_PHOTOS: dict[str, bool] = {
    "astronaut": False,
    "coffee": False,
    "chelsea": False,
    "rocket": True,
    "hubble_deep_field": False,
    "immunohistochemistry": True,
    "retina": True,
    "motorcycle": True,
    "camera": True,
    "coins": False,
    "moon": True,
    "brick": True,
    "grass": True,
    "gravel": True,
}

TUXPAINT_CATEGORIES: dict[str, CutoutCategory] = {
    "birds": CutoutCategory("birds", ("animals/birds",)),
    "fish": CutoutCategory("fish", ("animals/fish",)),
    "insects": CutoutCategory("insects", ("animals/insects",)),
    "rodents": CutoutCategory("rodents", ("animals/mammals/rodents",)),
    "hoofed_animals": CutoutCategory(
        "hoofed animals",
        ("animals/mammals/bovines", "animals/mammals/equines", "animals/mammals/deer", "animals/mammals/camel"),
    ),
    "fruits": CutoutCategory("fruits", ("food/fruit",)),
    "vegetables": CutoutCategory("vegetables", ("food/vegetables",)),
    "flowers": CutoutCategory("flowers", ("plants/flowers",)),
    "tools": CutoutCategory("tools", ("household/tools",)),
}
TUXPAINT_STAMPS = "usr/share/tuxpaint/stamps"
