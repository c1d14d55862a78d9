"""Generate the training caption banks captions/facs_en.csv and captions/facs_ko.csv (issue 19).

Sentences are composed from parts written here: the FACS action units of each expression in plain words, feeling
words, situations, and short forms, through a few templates (short phrases to full sentences). The output is
deterministic: no randomness except one fixed-seed shuffle, so two runs write byte-identical files.
The generator refuses to write a bank that shares a sentence (case and punctuation folded) with the held-out sets
(select.csv, everyday*.csv, compound.csv) or the paper/rich banks.

    python captions/generate.py [OUT_DIR]
"""
from __future__ import annotations

import argparse
import csv
import io
import random
import re
import sys
from itertools import combinations
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLASSES = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt")
HELD_OUT = ("select.csv", "everyday.csv", "everyday_ko.csv", "compound.csv", "paper.csv", "rich.csv")
SEED = 19
CAP = 360  # at most this many sentences per class and language

# --- English parts -------------------------------------------------------------------------------------------------
EN = {
    "neutral": dict(
        au=["relaxed facial muscles", "brows resting in place", "eyes open as usual", "lips lightly closed",
            "lip corners neither up nor down", "a calm, level gaze"],
        feel=["blank", "calm", "composed", "impassive", "expressionless"],
        noun="neutrality",
        situ=["someone waiting in a queue", "someone posing for a passport photo", "someone reading a timetable",
              "someone listening to a routine announcement"],
        short=["a blank face", "a relaxed, still face", "no expression at all", "an unmoved face"]),
    "happiness": dict(
        au=["raised cheeks", "lip corners pulled up", "crinkled eyes", "eyes narrowed into crescents",
            "teeth showing", "a wide smile"],
        feel=["joyful", "cheerful", "delighted", "happy", "glad"],
        noun="joy",
        situ=["someone who just heard great news", "someone greeting an old friend", "someone opening a present",
              "someone laughing at a good joke"],
        short=["a grin", "a beaming smile", "a big happy smile", "a cheerful grin"]),
    "sadness": dict(
        au=["inner brows raised", "brows drawn together", "lip corners turned down", "heavy, drooping eyelids",
            "moist eyes", "a downcast gaze"],
        feel=["sad", "sorrowful", "gloomy", "downhearted", "miserable"],
        noun="sorrow",
        situ=["someone who just lost something dear", "someone saying goodbye for good",
              "someone who received bad news", "someone holding back tears"],
        short=["a sad frown", "a downcast face", "a sorrowful look", "a tearful face"]),
    "surprise": dict(
        au=["brows raised high", "horizontal lines across the forehead", "eyes wide open", "upper lids lifted",
            "a dropped jaw", "a loose, open mouth"],
        feel=["surprised", "astonished", "amazed", "startled", "stunned"],
        noun="astonishment",
        situ=["someone walking into a surprise party", "someone who got an unexpected gift",
              "someone hearing unbelievable news", "someone bumping into an old friend by chance"],
        short=["a gasp", "an amazed face", "a wide-eyed, open-mouthed face", "an astonished look"]),
    "fear": dict(
        au=["brows raised and pulled together", "eyes wide and tense", "tightened lower lids",
            "lips stretched tight sideways", "a tense, open mouth", "strained neck muscles"],
        feel=["frightened", "afraid", "terrified", "scared", "panicked"],
        noun="fear",
        situ=["someone who saw something in the dark", "someone facing sudden danger",
              "someone frozen by a strange noise", "someone looking for a way to escape"],
        short=["a terrified face", "a frightened look", "a scared, tense face", "a look of terror"]),
    "disgust": dict(
        au=["a wrinkled nose", "a crinkled nose bridge", "the upper lip raised", "the lower lip pushed down",
            "lip corners pulled down", "the head pulled back"],
        feel=["disgusted", "revolted", "repulsed", "nauseated", "grossed-out"],
        noun="disgust",
        situ=["someone smelling spoiled food", "someone who stepped on a bug", "someone touching something filthy",
              "someone tasting something foul"],
        short=["a disgusted grimace", "a revolted face", "a look of revulsion", "an ew face"]),
    "anger": dict(
        au=["brows lowered and drawn together", "glaring eyes", "tightened eyelids", "lips pressed hard together",
            "thin, tight lips", "flared nostrils"],
        feel=["angry", "furious", "enraged", "irate", "livid"],
        noun="anger",
        situ=["someone who was cut in line", "someone glaring at a person who broke a promise",
              "someone about to explode", "someone treated unfairly"],
        short=["an angry scowl", "a furious glare", "a face red with rage", "a hostile scowl"]),
    "contempt": dict(
        au=["one lip corner raised on one side only", "one mouth corner tightened and pulled back",
            "a lopsided sneer", "the chin tilted up", "eyes looking down the nose", "one brow slightly raised"],
        feel=["contemptuous", "scornful", "disdainful", "condescending", "dismissive"],
        noun="contempt",
        situ=["someone who finds the other person pathetic", "someone mocking another's mistake",
              "someone who thinks they are above it all", "someone brushing off what was said with a scoff"],
        short=["a smirk", "a scornful sneer", "a disdainful half-smirk", "a condescending look"]),
}

# --- Korean parts: each facial action as (connective form, adnominal form) -------------------------------------
KO = {
    "neutral": dict(
        au=[("얼굴 근육이 편안하게 풀려 있고", "얼굴 근육이 편안하게 풀린"), ("눈썹이 제자리에 가만히 있고", "눈썹이 제자리에 가만히 있는"),
            ("눈을 평소처럼 뜨고", "눈을 평소처럼 뜬"), ("입을 가볍게 다물고", "입을 가볍게 다문"),
            ("입꼬리가 올라가지도 내려가지도 않고", "입꼬리가 올라가지도 내려가지도 않은"),
            ("시선이 정면을 담담하게 향하고", "시선이 정면을 담담하게 향한")],
        feel=["무표정한", "담담한", "차분한", "무덤덤한", "평온한"],
        situ=["여권 사진을 찍는", "줄을 서서 차례를 기다리는", "멍하니 창밖을 보는", "버스 시간표를 읽는"],
        short=["아무 표정 없는 얼굴", "감정이 드러나지 않는 얼굴", "밋밋한 표정", "가만히 있는 얼굴"]),
    "happiness": dict(
        au=[("볼이 올라가고", "볼이 올라간"), ("입꼬리가 위로 올라가고", "입꼬리가 위로 올라간"),
            ("눈가에 주름이 잡히고", "눈가에 주름이 잡힌"), ("눈이 초승달처럼 휘어지고", "눈이 초승달처럼 휜"),
            ("이가 환하게 드러나고", "이가 환하게 드러난"), ("입을 활짝 벌려 웃고", "입을 활짝 벌려 웃는")],
        feel=["기쁜", "행복한", "즐거운", "신난", "흐뭇한"],
        situ=["좋은 소식을 막 들은", "오랜 친구를 반갑게 만난", "합격 소식을 받은", "재미있는 농담에 웃는"],
        short=["활짝 웃는 얼굴", "함박웃음", "환하게 웃는 표정", "싱글벙글한 얼굴"]),
    "sadness": dict(
        au=[("눈썹 안쪽이 올라가고", "눈썹 안쪽이 올라간"), ("미간이 찌푸려지고", "미간이 찌푸려진"),
            ("입꼬리가 아래로 처지고", "입꼬리가 아래로 처진"), ("눈꺼풀이 무겁게 내려앉고", "눈꺼풀이 무겁게 내려앉은"),
            ("눈가가 촉촉하고", "눈가가 촉촉한"), ("시선이 아래로 떨어지고", "시선이 아래로 떨어진")],
        feel=["슬픈", "서글픈", "우울한", "울적한", "서러운"],
        situ=["소중한 것을 잃은", "이별을 막 겪은", "나쁜 소식을 전해 들은", "혼자 눈물을 참는"],
        short=["울먹이는 얼굴", "시무룩한 표정", "눈물이 고인 얼굴", "풀이 죽은 얼굴"]),
    "surprise": dict(
        au=[("눈썹이 높이 치켜올라가고", "눈썹이 높이 치켜올라간"), ("이마에 가로 주름이 생기고", "이마에 가로 주름이 생긴"),
            ("눈이 휘둥그레지고", "눈이 휘둥그레진"), ("윗눈꺼풀이 번쩍 들리고", "윗눈꺼풀이 번쩍 들린"),
            ("턱이 툭 떨어지고", "턱이 툭 떨어진"), ("입이 동그랗게 벌어지고", "입이 동그랗게 벌어진")],
        feel=["놀란", "깜짝 놀란", "어리둥절한", "놀라움에 찬", "믿기지 않는 듯한"],
        situ=["예상치 못한 선물을 받은", "깜짝 파티에 들어선", "믿기 힘든 소식을 들은", "뜻밖의 사람과 마주친"],
        short=["눈이 동그래진 얼굴", "입이 떡 벌어진 표정", "깜짝 놀란 얼굴", "화들짝 놀란 표정"]),
    "fear": dict(
        au=[("눈썹이 올라가면서 가운데로 몰리고", "눈썹이 올라가면서 가운데로 몰린"), ("눈을 크게 뜬 채 굳어 있고", "눈을 크게 뜬 채 굳은"),
            ("아래 눈꺼풀에 힘이 들어가고", "아래 눈꺼풀에 힘이 들어간"),
            ("입술이 옆으로 팽팽하게 당겨지고", "입술이 옆으로 팽팽하게 당겨진"),
            ("입이 긴장한 채 벌어지고", "입이 긴장한 채 벌어진"), ("목에 힘줄이 서고", "목에 힘줄이 선")],
        feel=["겁에 질린", "두려워하는", "무서워하는", "불안에 떠는", "공포에 질린"],
        situ=["어둠 속에서 무언가를 본", "위험이 코앞에 닥친", "낯선 소리에 얼어붙은", "도망칠 곳을 찾는"],
        short=["겁에 질린 얼굴", "새파랗게 질린 표정", "공포에 떠는 얼굴", "잔뜩 겁먹은 표정"]),
    "disgust": dict(
        au=[("콧등에 주름이 잡히고", "콧등에 주름이 잡힌"), ("코를 찡그리고", "코를 찡그린"),
            ("윗입술이 들려 올라가고", "윗입술이 들려 올라간"), ("아랫입술이 아래로 밀려나고", "아랫입술이 아래로 밀려난"),
            ("입꼬리가 아래로 당겨지고", "입꼬리가 아래로 당겨진"), ("고개를 살짝 뒤로 빼고", "고개를 살짝 뒤로 뺀")],
        feel=["역겨워하는", "불쾌한", "질색하는", "혐오스러워하는", "메스꺼워하는"],
        situ=["상한 음식 냄새를 맡은", "벌레를 밟은", "더러운 것을 만진", "비위가 상한"],
        short=["질색하는 얼굴", "우웩 하는 표정", "구역질 나는 듯한 얼굴", "인상을 확 쓴 역겨운 표정"]),
    "anger": dict(
        au=[("눈썹이 아래로 내려와 미간에 모이고", "눈썹이 아래로 내려와 미간에 모인"), ("눈을 부릅뜨고", "눈을 부릅뜬"),
            ("눈꺼풀이 팽팽하게 조여지고", "눈꺼풀이 팽팽하게 조여진"), ("입술을 꽉 다물고", "입술을 꽉 다문"),
            ("입술이 얇게 굳어지고", "입술이 얇게 굳은"), ("콧구멍이 벌름거리고", "콧구멍이 벌름거리는")],
        feel=["화난", "성난", "분노한", "격분한", "약이 오른"],
        situ=["새치기를 당한", "약속을 어긴 상대를 노려보는", "참다못해 폭발하기 직전인", "부당한 대우를 받은"],
        short=["잔뜩 화난 얼굴", "씩씩대는 표정", "노려보는 얼굴", "분노로 일그러진 얼굴"]),
    "contempt": dict(
        au=[("한쪽 입꼬리만 비스듬히 올라가고", "한쪽 입꼬리만 비스듬히 올라간"), ("입가 한쪽이 옆으로 당겨지고", "입가 한쪽이 옆으로 당겨진"),
            ("입술이 비뚜름하게 비틀리고", "입술이 비뚜름하게 비틀린"), ("턱을 살짝 치켜들고", "턱을 살짝 치켜든"),
            ("눈을 내리깔아 내려다보고", "눈을 내리깔아 내려다보는"), ("눈썹 한쪽이 살짝 올라가고", "눈썹 한쪽이 살짝 올라간")],
        feel=["경멸하는", "깔보는", "업신여기는", "비웃는", "냉소적인"],
        situ=["상대를 한심하게 여기는", "남의 실수를 비웃는", "자기가 한 수 위라고 여기는", "상대의 말을 코웃음으로 넘기는"],
        short=["피식 비웃는 얼굴", "코웃음 치는 표정", "깔보는 듯한 얼굴", "한쪽 입꼬리만 올린 냉소"]),
}


# --- Everyday words (issue 19: casual phrasing held) ---------------------------------------------------------------
# Short colloquial feeling words, in a few casual frames. Measured: without them the text head read long composed
# descriptions well and short everyday ones poorly (BENCHMARKS.md, "Casual words in the training bank").
CASUAL_EN = {
    "neutral": ["blank", "bored", "unbothered", "chill", "zoned-out", "stone-faced", "placid", "vacant", "deadpan"],
    "happiness": ["giddy", "thrilled", "stoked", "gleeful", "smiley", "jolly", "elated", "ecstatic", "cheery"],
    "sadness": ["bummed", "gutted", "heartbroken", "teary", "weepy", "mopey", "glum", "crushed", "devastated"],
    "surprise": ["shocked", "stunned", "floored", "speechless", "startled", "flabbergasted", "dumbfounded",
                 "wide-eyed", "astounded"],
    "fear": ["scared", "terrified", "petrified", "spooked", "freaked out", "panicky", "jumpy", "frightened", "alarmed"],
    "disgust": ["grossed out", "repulsed", "nauseous", "queasy", "revolted", "sickened", "squeamish", "disgusted",
                "put off by a smell"],
    "anger": ["mad", "furious", "pissed", "livid", "enraged", "irate", "seething", "raging", "ticked off"],
    "contempt": ["smug", "snooty", "condescending", "scornful", "disdainful", "snide", "haughty", "dismissive",
                 "sneering"],
}
CASUAL_KO = {
    "neutral": ["멍한", "무심한", "덤덤한", "밋밋한", "무감각한", "별 감흥 없는", "태연한", "평범한", "감정 없는"],
    "happiness": ["신난", "기쁜", "즐거운", "해맑은", "흐뭇한", "들뜬", "행복한", "웃음 가득한", "기분 좋은"],
    "sadness": ["슬픈", "기운 없는", "서글픈", "울적한", "침울한", "눈물 맺힌", "처량한", "속상한", "울먹이는"],
    "surprise": ["놀란", "어안이 벙벙한", "얼떨떨한", "충격받은", "어리둥절한", "깜짝 놀란", "눈이 커진", "입 벌린",
                 "기가 막힌 듯 놀란"],
    "fear": ["무서워하는", "잔뜩 움츠린", "두려운", "공포에 질린", "불안한", "오싹한", "떨고 있는", "소름 돋은", "질린"],
    "disgust": ["역겨운", "혐오스러운", "메스꺼운", "몸서리치는", "질색하는", "불쾌한", "구역질 나는", "인상 쓴",
                "더러워하는"],
    "anger": ["골난", "성난", "열받은", "짜증 난", "화가 치민", "언짢은", "뿔난", "약 오른", "노발대발한"],
    "contempt": ["깔보는", "거만한", "오만한", "콧대 높은", "빈정대는", "하찮게 보는", "얕보는", "비꼬는",
                 "비아냥대는"],
}
CASUAL_FRAMES_EN = ("looking {w}", "so {w} right now", "a person who looks {w}", "kind of {w}")
CASUAL_FRAMES_KO = ("{w} 얼굴", "{w} 표정", "{w} 사람", "{w} 눈빛", "완전 {w} 얼굴", "누가 봐도 {w} 표정")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def english(label: str) -> list[str]:
    p = EN[label]
    out = list(p["short"])
    for a, b in combinations(p["au"], 2):
        out.append(f"a face with {a} and {b}")
        for f in p["feel"]:
            out.append(f"{_article(f)} {f} face with {a} and {b}")
            out.append(f"photo of {_article(f)} {f} person, {a} and {b}")
        for s in p["situ"]:
            out.append(f"An expression of {p['noun']}, with {a} and {b}. The person looks like {s}.")
    for f in p["feel"]:
        for s in p["situ"]:
            out.append(f"someone looking {f}, like {s}")
    for a in p["au"]:
        for s in p["situ"]:
            out.append(f"a person who looks like {s}, with {a}")
    return out + [f.format(w=w) for w in CASUAL_EN[label] for f in CASUAL_FRAMES_EN]


def korean(label: str) -> list[str]:
    p = KO[label]
    out = list(p["short"]) + [s.replace(" ", "") for s in p["short"]]  # spacing variants
    for (ac, _), (_, bn) in combinations(p["au"], 2):
        out.append(f"{ac} {bn} 얼굴")
        out.append(f"{ac} {bn} 얼굴이에요")
        for f in p["feel"]:
            out.append(f"{ac} {bn} {f} 표정")
            out.append(f"사진 속 {f} 사람은 {ac} {bn} 얼굴을 하고 있다")
        for s in p["situ"]:
            out.append(f"{ac} {bn} 얼굴로, {s} 사람처럼 보입니다.")
    for f in p["feel"]:
        for s in p["situ"]:
            out.append(f"{s} 사람의 {f} 표정")
    return out + [f.format(w=w) for w in CASUAL_KO[label] for f in CASUAL_FRAMES_KO]


def norm_sentence(s: str) -> str:
    """Case, punctuation and spacing folded (as bench/ferplus_sentences.norm_sentence)."""
    return " ".join(re.sub(r"[^\w\s']", " ", s.lower()).split())


def _finish(label: str, sentences: list[str]) -> list[str]:
    seen, out = set(), []
    for s in sentences:
        k = norm_sentence(s)
        if k not in seen:
            seen.add(k)
            out.append(s)
    rng = random.Random(f"{SEED}-{label}")
    rng.shuffle(out)
    return out[:CAP]


def build_banks() -> dict[str, dict[str, list[str]]]:
    """{'en': {label: sentences}, 'ko': {...}}."""
    return {"en": {c: _finish(c, english(c)) for c in CLASSES},
            "ko": {c: _finish(c, korean(c)) for c in CLASSES}}


def held_out_sentences(caption_dir: Path = HERE) -> dict[str, str]:
    """normalised sentence -> file name, over the held-out and hand-written sets that exist."""
    out = {}
    for name in HELD_OUT:
        path = caption_dir / name
        if path.is_file():
            with path.open(encoding="utf-8", newline="") as fh:
                for row in csv.DictReader(fh):
                    out.setdefault(norm_sentence(row["caption"]), name)
    return out


def to_csv(bank: dict[str, list[str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["label", "caption"])
    for label in CLASSES:
        for s in bank[label]:
            w.writerow([label, s])
    return buf.getvalue()


def write_banks(out_dir: str | Path = HERE, caption_dir: Path = HERE) -> list[Path]:
    """Write facs_en.csv and facs_ko.csv under out_dir; refuse (SystemExit) if a sentence is in a held-out set."""
    banks = build_banks()
    held = held_out_sentences(caption_dir)
    for lang, bank in banks.items():
        for label, sentences in bank.items():
            for s in sentences:
                if norm_sentence(s) in held:
                    raise SystemExit(f"refusing to write facs_{lang}.csv: {label} sentence {s!r} is also in "
                                     f"{held[norm_sentence(s)]}; reword the part in captions/generate.py")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for lang, bank in banks.items():
        path = out_dir / f"facs_{lang}.csv"
        path.write_bytes(to_csv(bank).encode("utf-8"))
        paths.append(path)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Writes facs_en.csv and facs_ko.csv (byte-identical on every run).")
    ap.add_argument("out_dir", nargs="?", default=str(HERE), help=f"folder to write them to (default {HERE})")
    a = ap.parse_args(argv)
    if not a.out_dir.strip() or (Path(a.out_dir).exists() and not Path(a.out_dir).is_dir()):
        ap.error(f"{a.out_dir!r}: give a folder")
    try:
        paths = write_banks(a.out_dir)
    except OSError as e:
        ap.error(f"{a.out_dir}: {e.strerror or e}")
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
