"""Write the training sets of the example adapters, and the held-out prompts they are judged on.

    python adapters/make_datasets.py      # -> adapters/{french,json,pirate}/train.jsonl, adapters/heldout.json

Every adapter sees the same English questions; only the assistant's answers differ:
  french  answers in French                      "La capitale du Japon est Tokyo."
  json    answers as one JSON object {"answer"}  {"answer": "Tokyo"}
  pirate  answers in pirate speak                "Arr, matey! The capital of Japan be Tokyo."
Questions come from templates over facts (capitals, sums, colours, opposites) plus open
questions answered by hand. The held-out prompts use countries, numbers, colours,
opposites and open questions that no training example contains. Seeded: reruns give the same files.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 0
SYSTEMS = ["You are a helpful assistant.", "You are a friendly assistant. Keep answers short."]

# country, French "of the country" (with its article), capital
CAPITALS = [
    ("France", "de la France", "Paris"), ("Japan", "du Japon", "Tokyo"), ("Italy", "de l'Italie", "Rome"),
    ("Spain", "de l'Espagne", "Madrid"), ("Germany", "de l'Allemagne", "Berlin"), ("Egypt", "de l'Égypte", "Le Caire"),
    ("Canada", "du Canada", "Ottawa"), ("Brazil", "du Brésil", "Brasilia"), ("Russia", "de la Russie", "Moscou"),
    ("China", "de la Chine", "Pékin"), ("India", "de l'Inde", "New Delhi"), ("Mexico", "du Mexique", "Mexico"),
    ("Portugal", "du Portugal", "Lisbonne"), ("Greece", "de la Grèce", "Athènes"), ("Ireland", "de l'Irlande", "Dublin"),
    ("Norway", "de la Norvège", "Oslo"), ("Sweden", "de la Suède", "Stockholm"), ("Poland", "de la Pologne", "Varsovie"),
    ("Austria", "de l'Autriche", "Vienne"), ("Belgium", "de la Belgique", "Bruxelles"), ("Peru", "du Pérou", "Lima"),
    ("Argentina", "de l'Argentine", "Buenos Aires"), ("Kenya", "du Kenya", "Nairobi"), ("Turkey", "de la Turquie", "Ankara"),
    ("Thailand", "de la Thaïlande", "Bangkok"), ("Vietnam", "du Vietnam", "Hanoï"), ("Morocco", "du Maroc", "Rabat"),
    ("Chile", "du Chili", "Santiago"), ("Cuba", "de Cuba", "La Havane"), ("Finland", "de la Finlande", "Helsinki"),
    ("Denmark", "du Danemark", "Copenhague"), ("Hungary", "de la Hongrie", "Budapest"),
]
HELDOUT_CAPITALS = [
    ("Australia", "de l'Australie", "Canberra"), ("the Netherlands", "des Pays-Bas", "Amsterdam"),
    ("South Korea", "de la Corée du Sud", "Séoul"), ("Switzerland", "de la Suisse", "Berne"),
]
CAPITAL_QUESTIONS = ["What is the capital of {c}?", "Which city is the capital of {c}?", "Tell me the capital of {c}.",
                     "Name the capital city of {c}.", "What's the capital of {c}?"]

# thing (English), the thing in French, colour (English), colour agreeing in French
COLOURS = [
    ("the sky", "Le ciel", "blue", "bleu"), ("grass", "L'herbe", "green", "verte"), ("snow", "La neige", "white", "blanche"),
    ("a banana", "Une banane", "yellow", "jaune"), ("coal", "Le charbon", "black", "noir"),
    ("a strawberry", "Une fraise", "red", "rouge"), ("an orange", "Une orange", "orange", "orange"),
    ("milk", "Le lait", "white", "blanc"), ("a lemon", "Un citron", "yellow", "jaune"), ("blood", "Le sang", "red", "rouge"),
    ("a tomato", "Une tomate", "red", "rouge"), ("the sun", "Le soleil", "yellow", "jaune"),
    ("a frog", "Une grenouille", "green", "verte"), ("chocolate", "Le chocolat", "brown", "marron"),
]
HELDOUT_COLOURS = [("a carrot", "Une carotte", "orange", "orange"), ("a lime", "Un citron vert", "green", "vert")]
COLOUR_QUESTIONS = ["What color is {t}?", "What is the colour of {t}?", "Which color is {t} usually?"]

# English word, its opposite, the French word, the French opposite
OPPOSITES = [
    ("hot", "cold", "chaud", "froid"), ("big", "small", "grand", "petit"), ("fast", "slow", "rapide", "lent"),
    ("happy", "sad", "heureux", "triste"), ("day", "night", "le jour", "la nuit"), ("up", "down", "haut", "bas"),
    ("open", "closed", "ouvert", "fermé"), ("light", "dark", "clair", "sombre"), ("old", "young", "vieux", "jeune"),
    ("early", "late", "tôt", "tard"), ("strong", "weak", "fort", "faible"), ("rich", "poor", "riche", "pauvre"),
    ("full", "empty", "plein", "vide"), ("wet", "dry", "mouillé", "sec"), ("easy", "hard", "facile", "difficile"),
    ("loud", "quiet", "bruyant", "silencieux"),
]
HELDOUT_OPPOSITES = [("long", "short", "long", "court"), ("clean", "dirty", "propre", "sale")]
OPPOSITE_QUESTIONS = ["What is the opposite of {w}?", "Give me the opposite of the word {w}.", "What's the antonym of {w}?"]

# Open questions: English answer (the json and pirate answers build on it), French answer.
OPEN = [
    ("How many days are in a week?", "There are seven days in a week.", "Il y a sept jours dans une semaine."),
    ("Why is the sea salty?", "The sea is salty because rivers carry minerals from rocks into it.",
     "La mer est salée parce que les rivières y apportent les minéraux des roches."),
    ("What is photosynthesis?", "Photosynthesis is how plants turn light, water and air into food.",
     "La photosynthèse est la façon dont les plantes transforment la lumière, l'eau et l'air en nourriture."),
    ("Give me a tip for sleeping better.", "Go to bed at the same time every night and keep your room dark.",
     "Couchez-vous à la même heure chaque soir et gardez votre chambre dans le noir."),
    ("What do bees make?", "Bees make honey and wax.", "Les abeilles font du miel et de la cire."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Une araignée a huit pattes."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system.",
     "Jupiter est la plus grande planète de notre système solaire."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet.",
     "C'est William Shakespeare qui a écrit Roméo et Juliette."),
    ("What is water made of?", "Water is made of hydrogen and oxygen.", "L'eau est composée d'hydrogène et d'oxygène."),
    ("Why do we need sleep?", "Sleep lets the body rest and helps the brain store memories.",
     "Le sommeil permet au corps de se reposer et aide le cerveau à garder les souvenirs."),
    ("Write a short greeting for a friend.", "Hello my friend, I hope you are having a wonderful day!",
     "Bonjour mon ami, j'espère que tu passes une très belle journée !"),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level.",
     "L'eau bout à 100 degrés Celsius au niveau de la mer."),
    ("How many continents are there?", "There are seven continents.", "Il y a sept continents."),
    ("What do cows drink?", "Cows drink water.", "Les vaches boivent de l'eau."),
    ("Suggest a name for a cat.", "You could call your cat Luna.", "Vous pourriez appeler votre chat Luna."),
    ("What is the fastest land animal?", "The cheetah is the fastest land animal.",
     "Le guépard est l'animal terrestre le plus rapide."),
    ("Why is the sky blue?", "The sky is blue because air scatters blue light more than red light.",
     "Le ciel est bleu parce que l'air diffuse la lumière bleue plus que la lumière rouge."),
    ("How do I make tea?", "Boil water, pour it over a tea bag and wait three minutes.",
     "Faites bouillir de l'eau, versez-la sur un sachet de thé et attendez trois minutes."),
    ("What is the tallest mountain in the world?", "Mount Everest is the tallest mountain in the world.",
     "Le mont Everest est la plus haute montagne du monde."),
    ("Tell me a fun fact.", "Octopuses have three hearts.", "Les pieuvres ont trois cœurs."),
    ("What is a computer?", "A computer is a machine that follows instructions to process information.",
     "Un ordinateur est une machine qui suit des instructions pour traiter des informations."),
    ("How many hours are in a day?", "There are twenty-four hours in a day.", "Il y a vingt-quatre heures dans une journée."),
    ("What is the main language of Brazil?", "The main language of Brazil is Portuguese.",
     "La langue principale du Brésil est le portugais."),
    ("Recommend a healthy breakfast.", "Try oatmeal with fruit and a glass of water.",
     "Essayez des flocons d'avoine avec des fruits et un verre d'eau."),
    ("What is the moon?", "The moon is a rock that travels around the Earth.",
     "La lune est un rocher qui tourne autour de la Terre."),
    ("Can you help me?", "Yes, of course. What do you need?", "Oui, bien sûr. De quoi avez-vous besoin ?"),
    ("Who are you?", "I am a helpful assistant.", "Je suis un assistant serviable."),
    ("What is your favorite color?", "I like blue, the color of the sea.", "J'aime le bleu, la couleur de la mer."),
    ("Describe a rainy day.", "The sky is grey, the streets are wet and people carry umbrellas.",
     "Le ciel est gris, les rues sont mouillées et les gens portent des parapluies."),
    ("How do plants grow?", "Plants grow with sunlight, water and good soil.",
     "Les plantes poussent grâce au soleil, à l'eau et à une bonne terre."),
    ("What should I eat for dinner?", "A bowl of soup with bread is a good dinner.",
     "Un bol de soupe avec du pain est un bon dîner."),
    ("Explain gravity simply.", "Gravity is the force that pulls things toward the ground.",
     "La gravité est la force qui attire les objets vers le sol."),
    ("What is the biggest ocean?", "The Pacific Ocean is the biggest ocean.", "L'océan Pacifique est le plus grand océan."),
    ("How do birds fly?", "Birds fly by flapping their wings, which push the air down.",
     "Les oiseaux volent en battant des ailes, qui poussent l'air vers le bas."),
    ("Why do leaves fall in autumn?", "Trees drop their leaves in autumn to save water during the winter.",
     "Les arbres perdent leurs feuilles en automne pour garder leur eau pendant l'hiver."),
    ("Tell me something about dogs.", "Dogs are loyal animals with a very good sense of smell.",
     "Les chiens sont des animaux fidèles qui ont un très bon odorat."),
    ("What is music?", "Music is sound arranged in time to make something beautiful.",
     "La musique est du son organisé dans le temps pour créer quelque chose de beau."),
    ("How can I learn to cook?", "Start with simple recipes and cook a little every day.",
     "Commencez par des recettes simples et cuisinez un peu chaque jour."),
    ("Hello!", "Hello! How can I help you today?", "Bonjour ! Comment puis-je vous aider aujourd'hui ?"),
    ("Thank you.", "You are welcome, I am happy to help.", "Je vous en prie, je suis content de vous aider."),
]
HELDOUT_OPEN = [
    "What is a volcano?", "Give me advice for a job interview.", "Why do cats purr?",
    "Describe the city at night.", "What is the best way to learn a new language?", "How does a bicycle work?",
]

PIRATE_WORDS = {"is": "be", "are": "be", "am": "be", "you": "ye", "your": "yer", "my": "me", "hello": "ahoy",
                "yes": "aye", "the world": "all the seven seas", "friend": "matey"}


def pirate(text: str) -> str:
    """Arr, matey! + the English answer in pirate words."""
    def swap(m: re.Match) -> str:
        word = PIRATE_WORDS[m[0].lower()]
        return word.capitalize() if m[0][0].isupper() else word

    pattern = r"\b(" + "|".join(sorted(PIRATE_WORDS, key=len, reverse=True)) + r")\b"
    return "Arr, matey! " + re.sub(pattern, swap, text, flags=re.IGNORECASE)


def as_json(answer: str) -> str:
    return json.dumps({"answer": answer}, ensure_ascii=False)


def facts(rng: random.Random, capitals, colours, opposites, sums: int) -> list[tuple[str, str, str, str]]:
    """(question, English answer, short answer, French answer) from the fact tables."""
    rows = []
    for country, fr_of, capital in capitals:
        rows.append((rng.choice(CAPITAL_QUESTIONS).format(c=country), f"The capital of {country} is {capital}.", capital,
                     f"La capitale {fr_of} est {capital}."))
    for thing, fr_thing, colour, fr_colour in colours:
        q = rng.choice(COLOUR_QUESTIONS).format(t=thing)
        rows.append((q, f"{thing[0].upper()}{thing[1:]} is {colour}.", colour, f"{fr_thing} est {fr_colour}."))
    for word, opposite, fr_word, fr_opposite in opposites:
        q = rng.choice(OPPOSITE_QUESTIONS).format(w=word)
        rows.append((q, f"The opposite of {word} is {opposite}.", opposite, f"Le contraire de « {fr_word} » est « {fr_opposite} »."))
    for _ in range(sums):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        if rng.random() < 0.5:
            rows.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", str(a + b), f"{a} plus {b} font {a + b}."))
        else:
            a, b = a % 12 + 2, b % 12 + 2
            rows.append((f"What is {a} times {b}?", f"{a} times {b} is {a * b}.", str(a * b), f"{a} fois {b} font {a * b}."))
    return rows


def answers(english: str, short: str, french: str) -> dict[str, str]:
    return {"french": french, "json": as_json(short), "pirate": pirate(english)}


def conversations(rng: random.Random) -> list[tuple[str, dict[str, str]]]:
    rows = [(q, answers(en, short, fr)) for q, en, short, fr in facts(rng, CAPITALS, COLOURS, OPPOSITES, sums=40)]
    rows += [(q, answers(en, en, fr)) for q, en, fr in OPEN]
    rows += [(q, answers(en, en, fr)) for q, en, fr in rng.sample(OPEN, 20)]  # open questions twice: the hard part
    return rows


def write_sets() -> None:
    rng = random.Random(SEED)
    rows = conversations(rng)
    rng.shuffle(rows)
    for adapter in ("french", "json", "pirate"):
        (HERE / adapter).mkdir(exist_ok=True)
        with open(HERE / adapter / "train.jsonl", "w", encoding="utf-8") as f:
            for i, (question, reply) in enumerate(rows):
                messages = [{"role": "user", "content": question}, {"role": "assistant", "content": reply[adapter]}]
                if i % 5 == 0:  # some with a system prompt, so the behaviour does not depend on SmolLM2's default one
                    messages.insert(0, {"role": "system", "content": SYSTEMS[i % 2]})
                    row = {"messages": messages}
                elif i % 2:
                    row = {"messages": messages}
                else:  # the other accepted format
                    row = {"prompt": question, "completion": reply[adapter]}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    heldout_rng = random.Random(SEED + 1)
    held = [q for q, *_ in facts(heldout_rng, HELDOUT_CAPITALS, HELDOUT_COLOURS, HELDOUT_OPPOSITES, sums=2)] + HELDOUT_OPEN
    train_questions = {q for q, _ in rows}
    assert not train_questions & set(held), "held-out prompts leaked into training"
    (HERE / "heldout.json").write_text(json.dumps(held, indent=1) + "\n")
    print(f"{len(rows)} training examples per adapter, {len(held)} held-out prompts")


if __name__ == "__main__":
    write_sets()
