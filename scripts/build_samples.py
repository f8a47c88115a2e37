"""Rebuild the bundled samples in peft_t5/data/ from the real data in ../shared/data (run once, by hand).

squad_v2_sample.json: 300 SQuAD v2.0 questions (150 answerable, 150 not) with their contexts, from 8 articles.
jokes_sample.csv: 500 question-answer jokes with crude or offensive ones left out by a word list.
"""
import csv
import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data"
OUT = ROOT / "peft_t5" / "data"

# Word stems that mark a joke as crude, sexual, violent or about groups of people.
BLOCK = re.compile(
    r"\b(sex|porn|rape|penis|vagina|dick|cock|pussy|boob|tit|ass|anal|butt|cum|fuck|shit|bitch|whore|slut|"
    r"hooker|prostitut|nigg|negro|black|white|asian|chinese|mexican|jew|muslim|arab|islam|christian|jesus|god|"
    r"gay|lesbian|trans|dead|die|kill|murder|abort|hitler|nazi|holocaust|terror|bomb|isis|blind|deaf|retard|"
    r"midget|fat|ugly|wife|girlfriend|husband|boyfriend|blonde|women|woman|girl|wom|nun|priest|pedo|child|kid|"
    r"orgasm|erect|horny|virgin|condom|nipple|breast|balls|testic|poop|fart|piss|pee|drug|weed|cocaine|drunk|"
    r"gun|shoot|suicid|cancer|aids|disab|crap|damn|hell|sucks?|blow|hole|wet|hard|length|inch|naked|strip|bra|"
    r"paedo|legs?|arms?|organ|jfk|kennedy|crash|paralymp|dwarf|amput|wheelchair|autis|epilep|handicap|tight|"
    r"stripper|moist|rubber|mother|mom|dad|wives|dating|date|bed|undress|spank|whip|slave|racist|gypsy|"
    r"mexic|irish|polish|indian|african|russian|korean|afghan|syria|iraq|israel|palestin|9/11|twin tower|"
    r"masturb|fap|kinky|pervert|coke|bab(y|ies)|bum|skirt|razor|depress|pms|mile high|underwear|stroke|fluid|"
    r"clinton|trump|hillary|putin|bully|wub|smell|eye|bernie|ill|sick|hospital|doctor|disease|prison|arrest|"
    r"rapist|homeless|urinal|parakeet|chirp|milk|puss|homosex|dill|doe|landmine|seizure|mummy|circumcis|fogle|crowbar|"
    r"mermaid|shell|gasoline|fire|minute|cannibal|fece|poo|redneck|border|juan|catholic|church|korea|blond|greek|"
    r"republican|democrat|politic|nostril|finger|lay|laid|sleep|touch|rub|wood|rear|behind|bottom|beaver|"
    r"doggy|bishop|coroner|houston|cond|offender|baiter|michael jackson|jihad|qaeda|grasshole|sensitive|stimulat|rehab|"
    r"molly|high|manure|bathroom|constipat|apartheid|terminal|fairies|stiff|sack|diabet|orphan|deport|mormon|"
    r"tweaker|dyslex|shot|shins|ali|\w*hole|boys|men|man|guy|lady|ladies|"
    r"feminis|kink|nast|diarr|rect|anus|cunt|fist|laxativ|syndrome|downs|pubic|hand job|necroph|prostat|urin|urolog|gynec|swinger|commando|tranny|drag|zipper|dolezal|anorex|abus|chav|slapper|extremist|laden|wheel ?chair|flea|dahmer|bobbit|hawking|stevie|robin williams|ledger|ray rice|zimmerman|darren wilson|michael brown|hummer|megan fox|newborn|booty|proctolog|coathanger|ebola|mesothelioma|traumatic|alabama|inbred|italian|postal|baptist|jamaican|rasta|aborigin|thai|somali|ethiopia|sikh|turban|hooligan|vietnam|deutsch|nsa|tap|dre|bullet|stones|smallest|saddam|kilt|sheep|pot|smoke|dna|goat|bloody|tongue|ethic|breed|witch|texas|unemploy|stink|funeral|taste|slip|thermometer|jockie|kicked|bucket|chick|cross|hit|wall|lighter|rated|lead|flint|rapper|tupac|shake|crack|cold one|steak|loving|hard|wreck|"
    r"britney|rampage|incontinent|69|quadripleg|limp|reptile|pits|buns|gigolo|mohel|mofo|diana|oriental|divorc|lubric|vestite|circum|skin|schizo|caitlyn|bulge|bulemi|bulimi|cosby|tampax|frank|gas|leper|ginger|year old|hips|siamese|riot|dodi|india|soviet|german|bulldog|shih|dirty|adolf|choke|bieber|pp|spanish|taliban|malala|iran|native|egypt|middle east|mooch|chest|ball|period|trailer|addict|alcohol|beer|wine|drink|bar|moron|stupid|idiot|lazy|insan|crazy|mental|anxi|"
    r"female|male|jew|debate|blower|nurse|tweek|doggie|comedian|roof|errect|genes|gladiator|bdsm|hispanic|turn on|"
    r"hindu|prayer|roman|caesar|robber|steal|cop|police|hairy|hair|"
    r"limb|crip|sjw|night stand|grenade|kkk|snow ?blower|masoch|grave|dying|spaniard|saggy|midwife|entendre|punch|"
    r"toilet|vomit|semen|sperm|pregnan|boner|wank|jerk|dildo|lick|swallow|screw|bang|nut)",
    re.IGNORECASE,
)

# Openings that mostly introduce puns, which are the cleanest part of the set.
PUN_OPENINGS = ("what do you call", "why did the", "what did the", "why do", "how do you", "where do", "what kind of")


def squad_sample(n_per_kind=150, n_articles=8, per_paragraph=2):
    data = json.loads((SHARED / "squad" / "squad-v2-dev-cs224n.json").read_text())
    counts = {True: 0, False: 0}
    articles = []
    for article in data["data"][:n_articles]:
        paragraphs = []
        for p in article["paragraphs"]:
            qas = []
            for impossible in (False, True):
                picked = [q for q in p["qas"] if q["is_impossible"] == impossible][:per_paragraph]
                picked = picked[: max(0, n_per_kind // n_articles + 1 - 0)]
                for q in picked:
                    if counts[impossible] < n_per_kind:
                        qas.append(q)
                        counts[impossible] += 1
            if qas:
                paragraphs.append({"context": p["context"], "qas": qas})
            if sum(counts.values()) >= (len(articles) + 1) * 2 * n_per_kind // n_articles:
                break
        articles.append({"title": article["title"], "paragraphs": paragraphs})
    return {"version": "v2.0", "data": articles}, counts


def jokes_sample(n=500, seed=0):
    rows = list(csv.DictReader(open(SHARED / "jokes" / "qa-jokes.csv", encoding="utf-8")))
    clean = [r for r in rows
             if r["Question"].strip().endswith("?") and r["Question"].lower().startswith(PUN_OPENINGS) and 2 <= len(r["Answer"].split()) <= 10
             and len(r["Question"].split()) <= 25 and not BLOCK.search(r["Question"] + " " + r["Answer"])
             and r["Answer"].isascii() and r["Question"].isascii()]
    random.Random(seed).shuffle(clean)
    return clean[:n], len(clean)


if __name__ == "__main__":
    squad, counts = squad_sample()
    (OUT / "squad_v2_sample.json").write_text(json.dumps(squad, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    jokes, n_clean = jokes_sample()
    with open(OUT / "jokes_sample.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["Question", "Answer"])
        w.writeheader()
        w.writerows({"Question": j["Question"].strip(), "Answer": j["Answer"].strip()} for j in jokes)
    print(f"squad: {counts[False]} answerable + {counts[True]} unanswerable; jokes: {len(jokes)} of {n_clean} clean")
