"""TravelGym's world: trip scenarios with hidden preferences over an options database (UserRL, arXiv 2509.19736,
section 3, TravelGym; the task design follows UserBench).

A scenario is a trip with 2-4 aspects (flight, hotel or apartment, rental car, restaurant). Each aspect has
1-4 hidden preferences, each a machine-checkable condition on one attribute of an option (`stops eq 0`,
`depart ge "09:00"`), and about ten options: "correct" ones meet every preference and the cheapest of them is
the "best"; "wrong" ones miss exactly one preference, and for every preference at least one of them is
cheaper than the best, so no preference can be skipped; "noise" ones miss one or more. The user asks, vaguely,
for the cheapest option that fits; the agent must search each aspect with the right arguments, draw the
preferences out by asking, and answer one option id per aspect.

    python -m gyms.travel   # regenerate data/travel/{train,test}.jsonl (byte-identical: fixed seeds)

`TravelSession` holds the mechanics of one episode (search judging, the every-5th-search failure, repeat
searches, preference reveals, one choice per aspect, scoring); `TravelGym` maps the agent's choices onto it. Its
three LLM roles ("travel.search_judge", "travel.question_judge", "travel.user") get their prompts and scripted
rules here. As in the original's training and evaluation (its async step), an episode ends when the best option
of every aspect has been chosen, on [finish], or at the turn limit: a wrong choice closes its aspect, so the
episode then runs on to the limit.
"""
import datetime
import json
import operator
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import users
from envs import FOOTER, Env, TaskDataError, expert_turn, pick, seeded_split

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "travel"
SPLITS = {"train": (1, 300), "test": (2, 100)}  # split -> (seed, number of tasks)
BEST_REWARD, CORRECT_REWARD = 1.0, 0.8  # the original's: the cheapest fitting option, any fitting option

# ----------------------------------------------------------------------------------------------------------
# Attribute tables (our own) and one sampler per aspect. Samplers draw attributes only; price and id come later.

CITIES = ["Boston", "Denver", "Chicago", "Seattle", "Austin", "Lisbon", "Madrid", "Berlin", "Vienna", "Prague",
          "Dublin", "Toronto", "Montreal", "Osaka", "Seoul", "Sydney", "Edinburgh", "Copenhagen", "Oslo",
          "Athens", "Rome", "Amsterdam", "Zurich", "Vancouver", "Singapore", "Nairobi", "Cape Town",
          "Buenos Aires", "Mexico City", "San Francisco", "New York", "Helsinki"]
AIRLINES = ["Aerolume", "Bluecrest Air", "Northwind", "Skyharbor", "Polar Jet", "Veridian Airways"]
CABINS = ["basic economy", "economy", "premium economy", "business"]
CAR_COMPANIES = ["Roadwise", "Drivana", "Metro Wheels", "Kestrel Rent", "Urbancar"]
CAR_CLASSES = {"economy": 4, "compact": 5, "midsize": 5, "SUV": 5, "minivan": 7}  # class -> seats
CUISINES = ["italian", "japanese", "mexican", "indian", "thai", "french", "lebanese", "korean"]
NAME_A = ["Harbor", "Maple", "Granite", "Silver", "Lantern", "Juniper", "Crescent", "Orchard", "Meridian",
          "Willow", "Cobalt", "Summit", "Amber", "Linden"]
NAME_B = {"hotel": ["House", "Court", "Inn", "Lodge", "Plaza", "Gardens"],
          "apartment": ["Loft", "Flat", "Studio", "Residence"],
          "restaurant": ["Table", "Kitchen", "Bistro", "Grill", "Canteen", "Tavern"]}


def hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _flight(rng):
    stops = rng.choice([0, 0, 1, 1, 2])
    duration = rng.randrange(70, 300, 5) + stops * rng.randrange(45, 150, 5)
    depart = rng.randrange(5 * 60, min(21 * 60, 23 * 60 + 45 - duration) + 1, 15)  # land the same day
    return {"airline": rng.choice(AIRLINES), "depart": hhmm(depart), "arrive": hhmm(depart + duration),
            "stops": stops, "cabin": rng.choice(CABINS), "bags": rng.choice([0, 0, 1, 1, 2]),
            "wifi": rng.random() < 0.5, "meal": rng.random() < 0.5, "refundable": rng.random() < 0.4}


def _hotel(rng):
    return {"name": f"{rng.choice(NAME_A)} {rng.choice(NAME_B['hotel'])}", "stars": rng.randint(2, 5),
            "rating": round(rng.uniform(6.5, 9.8), 1), "km_to_center": round(rng.uniform(0.2, 8.0), 1),
            "breakfast": rng.random() < 0.5, "free_cancellation": rng.random() < 0.5,
            "parking": rng.random() < 0.5, "pool": rng.random() < 0.4, "gym": rng.random() < 0.5,
            "pets": rng.random() < 0.4, "airport_shuttle": rng.random() < 0.4}


def _apartment(rng):
    return {"name": f"{rng.choice(NAME_A)} {rng.choice(NAME_B['apartment'])}", "bedrooms": rng.randint(1, 3),
            "kitchen": rng.random() < 0.6, "washer": rng.random() < 0.5, "balcony": rng.random() < 0.5,
            "self_checkin": rng.random() < 0.5, "desk": rng.random() < 0.5,
            "host_rating": round(rng.uniform(4.0, 5.0), 2), "elevator": rng.random() < 0.5,
            "pets": rng.random() < 0.4}


def _car(rng):
    cls = rng.choice(list(CAR_CLASSES))
    return {"company": rng.choice(CAR_COMPANIES), "class": cls, "seats": CAR_CLASSES[cls],
            "transmission": rng.choice(["automatic", "automatic", "manual"]),
            "fuel": rng.choice(["petrol", "diesel", "hybrid", "electric"]),
            "unlimited_km": rng.random() < 0.5, "pickup": rng.choice(["airport", "downtown"]),
            "insurance": rng.random() < 0.4, "child_seat": rng.random() < 0.4}


def _restaurant(rng):
    return {"name": f"{rng.choice(NAME_A)} {rng.choice(NAME_B['restaurant'])}", "cuisine": rng.choice(CUISINES),
            "rating": round(rng.uniform(3.4, 5.0), 1), "vegetarian": rng.random() < 0.5,
            "outdoor": rng.random() < 0.5, "noise": rng.choice(["quiet", "moderate", "lively"]),
            "wheelchair": rng.random() < 0.6, "open_until": hhmm(rng.randrange(21 * 60, 23 * 60 + 31, 30))}


@dataclass(frozen=True)
class Aspect:
    letter: str
    """first letter of its option ids"""
    args: tuple
    """the search arguments a query must state"""
    words: tuple
    """words that say a query or question is about this aspect"""
    prices: tuple
    """(low, high) integer price range"""
    unit: str
    """what a price is for"""
    sample: object
    """rng -> option attributes"""


ASPECTS = {
    "flight": Aspect("F", ("origin", "destination", "date"), ("flight", "fly", "plane", "airfare", "airline"),
                     (90, 900), "USD per ticket", _flight),
    "hotel": Aspect("H", ("city", "check_in", "check_out"), ("hotel",), (70, 480), "USD per night", _hotel),
    "apartment": Aspect("A", ("city", "check_in", "check_out"),
                        ("apartment", "flat", "vacation rental", "holiday rental", "airbnb"),
                        (60, 400), "USD per night", _apartment),
    "car": Aspect("C", ("city", "pickup_date", "return_date"), ("car", "rental car", "car rental", "vehicle"),
                  (25, 160), "USD per day", _car),
    "restaurant": Aspect("R", ("city", "date"), ("restaurant", "dinner", "dining", "table"),
                         (15, 110), "USD per person", _restaurant),
}

# ----------------------------------------------------------------------------------------------------------
# The preference catalogue. Each: a condition `option[attr] <op> value`, a plain statement, a hint the user
# gives instead of stating it (indirect, but precise enough to decide every option), and the words that make
# a question "about" it. A preference with `choices` draws its value per scenario and fills `{v}`.


@dataclass(frozen=True)
class Pref:
    name: str
    attr: str
    op: str
    value: object
    text: str
    hint: str
    keywords: tuple
    choices: tuple = ()


OPS = {"eq": operator.eq, "ne": operator.ne, "ge": operator.ge, "le": operator.le, "in": lambda a, b: a in b}

CATALOGUE = {
    "flight": [
        Pref("early_start", "depart", "ge", "09:00", "The flight departs at 09:00 or later.",
             "Mornings are rough for me; I really don't want to be taking off before nine.",
             ("depart", "departure", "leave", "take off", "morning", "early")),
        Pref("day_start", "depart", "le", "13:00", "The flight departs at 13:00 or earlier.",
             "I want most of the day still ahead of me when I get going, so nothing that takes off after one in "
             "the afternoon.",
             ("depart", "departure", "leave", "take off", "afternoon")),
        Pref("arrive_by", "arrive", "le", "19:00", "The flight lands by 19:00.",
             "A friend is picking me up and has to be gone by seven in the evening, so I need to be on the ground "
             "by then.",
             ("arrive", "arrival", "land", "landing", "get in")),
        Pref("nonstop", "stops", "eq", 0, "The flight is nonstop.",
             "Changing planes stresses me out terribly; I want to board once and get off where I'm going.",
             ("nonstop", "non-stop", "direct", "stop", "layover", "connection", "connecting", "change planes")),
        Pref("checked_bag", "bags", "ge", 1, "At least one checked bag is included.",
             "I'm hauling a suitcase full of gifts, far too much for the cabin, and I don't want to pay extra at "
             "the counter.",
             ("bag", "baggage", "luggage", "suitcase", "checked")),
        Pref("wifi", "wifi", "eq", True, "The flight has wifi.",
             "I'm on a deadline, so I have to stay online and keep working while I'm in the air.",
             ("wifi", "wi-fi", "internet", "online", "connectivity")),
        Pref("roomy_cabin", "cabin", "in", ["premium economy", "business"], "Premium economy or business.",
             "I'm very tall and regular economy legroom is torture; I need a class above it.",
             ("cabin", "class", "seat", "legroom", "economy", "business", "premium")),
        Pref("no_basic", "cabin", "ne", "basic economy", "Not basic economy.",
             "I refuse to buy those stripped-down fares where you can't even choose a seat.",
             ("cabin", "class", "seat", "economy", "fare type", "basic")),
        Pref("meal", "meal", "eq", True, "A meal is served on board.",
             "I'll rush from a meeting to the airport with no time to eat, so I'll want food once I'm on board.",
             ("meal", "food", "snack", "catering", "hungry")),
        Pref("refundable", "refundable", "eq", True, "The ticket is refundable.",
             "My plans could still change, so I must be able to get my money back for the ticket.",
             ("refund", "refundable", "cancel", "cancellation", "flexible")),
        Pref("avoid_airline", "airline", "ne", None, "Not flown by {v}.",
             "I had a miserable time with {v} last year and swore never to fly with them again.",
             ("airline", "carrier"), tuple(AIRLINES)),
    ],
    "hotel": [
        Pref("stars", "stars", "ge", 4, "The hotel has at least 4 stars.",
             "It's our anniversary, and I'd be embarrassed to take my partner anywhere below four stars.",
             ("star", "luxury", "upscale", "fancy", "quality", "standard")),
        Pref("rating", "rating", "ge", 8.5, "Guest rating 8.5 or higher.",
             "I go by what past guests say, and I won't book anywhere they score under 8.5 out of 10.",
             ("review", "rating", "rated", "score", "guest")),
        Pref("central", "km_to_center", "le", 2.0, "At most 2 km from the center.",
             "I won't have a car and love to walk, so I want to be two kilometres from the centre at the very most.",
             ("center", "centre", "downtown", "location", "distance", "far", "close", "walk", "central")),
        Pref("breakfast", "breakfast", "eq", True, "Breakfast is included.",
             "I'm useless until I've eaten, and I'd like that taken care of right where I'm sleeping.",
             ("breakfast", "morning meal")),
        Pref("free_cancellation", "free_cancellation", "eq", True, "Free cancellation.",
             "My dates may still move, so I must be able to call it off without paying a penny.",
             ("cancel", "cancellation", "refund", "flexible")),
        Pref("parking", "parking", "eq", True, "On-site parking.",
             "I'm driving there in my own car and need somewhere to leave it at the hotel.",
             ("parking", "park", "garage")),
        Pref("pool", "pool", "eq", True, "The hotel has a pool.",
             "I swim laps every single morning and don't want to skip that while I'm away.",
             ("pool", "swim", "swimming")),
        Pref("gym", "gym", "eq", True, "The hotel has a gym.",
             "I never miss a workout, so I need exercise equipment where I'm staying.",
             ("gym", "fitness", "workout", "exercise")),
        Pref("pets", "pets", "eq", True, "Pets are allowed.",
             "My dog comes everywhere with me, and I won't leave him behind.",
             ("pet", "dog", "cat", "animal")),
        Pref("shuttle", "airport_shuttle", "eq", True, "An airport shuttle is offered.",
             "I'd love for the place itself to send someone to fetch me at the airport.",
             ("shuttle", "airport transfer", "pick up", "pickup", "transport")),
    ],
    "apartment": [
        Pref("two_bedrooms", "bedrooms", "ge", 2, "At least 2 bedrooms.",
             "My sister is coming along, and we each need a room of our own to sleep in.",
             ("bedroom", "room", "sleep", "bed", "space", "size")),
        Pref("three_bedrooms", "bedrooms", "ge", 3, "At least 3 bedrooms.",
             "There are three of us, and every one of us wants a separate room to sleep in.",
             ("bedroom", "room", "sleep", "bed", "space", "size")),
        Pref("kitchen", "kitchen", "eq", True, "A kitchen.",
             "I have strict dietary needs and plan to cook every meal myself.",
             ("kitchen", "cook", "cooking", "meal")),
        Pref("washer", "washer", "eq", True, "A washing machine.",
             "I'm packing very light for a long stay, so I'll have to wash my clothes there.",
             ("washer", "washing machine", "laundry", "wash")),
        Pref("balcony", "balcony", "eq", True, "A balcony.",
             "I love having my morning coffee in the fresh air without leaving the flat.",
             ("balcony", "terrace", "outdoor space", "fresh air")),
        Pref("self_checkin", "self_checkin", "eq", True, "Self check-in.",
             "I get in after midnight and don't want to arrange meeting anyone to get the keys.",
             ("check-in", "check in", "checkin", "key", "arrival time")),
        Pref("desk", "desk", "eq", True, "A desk to work at.",
             "I'll be working remotely the whole time and need a proper place to sit and type.",
             ("desk", "workspace", "work", "office", "working")),
        Pref("host_rating", "host_rating", "ge", 4.7, "Host rating 4.7 or higher.",
             "I only trust hosts that guests adore; anything rated below 4.7 makes me nervous.",
             ("host", "rating", "review", "rated")),
        Pref("elevator", "elevator", "eq", True, "An elevator.",
             "My knees are bad, so carrying luggage up flights of stairs is out of the question.",
             ("elevator", "lift", "stairs", "floor", "accessible", "accessibility")),
        Pref("pets", "pets", "eq", True, "Pets are allowed.",
             "My cat comes with me, so the place has to be fine with animals.",
             ("pet", "cat", "dog", "animal")),
    ],
    "car": [
        Pref("automatic", "transmission", "eq", "automatic", "Automatic transmission.",
             "I never learned to drive with a clutch pedal.",
             ("automatic", "manual", "transmission", "gear", "stick", "clutch")),
        Pref("seven_seats", "seats", "ge", 7, "At least 7 seats.",
             "There will be seven of us piling into the car.",
             ("seat", "people", "passenger", "size", "big", "fit", "how many")),
        Pref("clean_fuel", "fuel", "in", ["hybrid", "electric"], "Hybrid or electric.",
             "I try hard to keep my carbon footprint down, so nothing that runs on petrol or diesel alone.",
             ("fuel", "electric", "hybrid", "petrol", "gas", "diesel", "green", "emission", "eco")),
        Pref("unlimited_km", "unlimited_km", "eq", True, "Unlimited mileage.",
             "We'll drive long stretches every day and I don't want to worry about a charge per kilometre.",
             ("mileage", "kilometre", "kilometer", "km", "mile", "limit", "distance")),
        Pref("airport_pickup", "pickup", "eq", "airport", "Picked up at the airport.",
             "I want to get behind the wheel the moment I land, without going into town first.",
             ("pick up", "pickup", "collect", "location", "airport")),
        Pref("insurance", "insurance", "eq", True, "Insurance included.",
             "I'm a nervous driver and want full coverage already included in the price.",
             ("insurance", "coverage", "cover", "protection", "damage")),
        Pref("child_seat", "child_seat", "eq", True, "A child seat.",
             "I'm travelling with my two-year-old, who needs a proper seat in the back.",
             ("child", "kid", "baby", "toddler", "infant", "car seat")),
        Pref("avoid_company", "company", "ne", None, "Not rented from {v}.",
             "{v} overcharged me on my last trip, and I'll never rent from them again.",
             ("company", "agency", "brand", "provider"), tuple(CAR_COMPANIES)),
    ],
    "restaurant": [
        Pref("cuisine", "cuisine", "eq", None, "The cuisine is {v}.",
             "I've been dreaming of {v} food for weeks, and tonight nothing else will do.",
             ("cuisine", "food", "kind of restaurant", "type of restaurant", "dish"), tuple(CUISINES)),
        Pref("avoid_cuisine", "cuisine", "ne", None, "The cuisine is not {v}.",
             "I got sick after a {v} meal last month and can't face that kind of food right now.",
             ("cuisine", "food", "kind of restaurant", "type of restaurant", "dish"), tuple(CUISINES)),
        Pref("vegetarian", "vegetarian", "eq", True, "Vegetarian dishes on the menu.",
             "My partner eats no meat or fish, so there have to be proper dishes for them.",
             ("vegetarian", "vegan", "meat", "diet", "dietary", "plant")),
        Pref("outdoor", "outdoor", "eq", True, "Outdoor seating.",
             "If the weather is nice I'd hate to be stuck indoors; I want to eat in the open air.",
             ("outdoor", "outside", "terrace", "patio", "open air", "garden")),
        Pref("quiet", "noise", "eq", "quiet", "A quiet place.",
             "It's a business dinner, and we need to hear each other without raising our voices.",
             ("noise", "quiet", "loud", "atmosphere", "ambience", "ambiance", "lively", "calm")),
        Pref("rating", "rating", "ge", 4.5, "Rated 4.5 or higher.",
             "I only go where diners rave; anything under 4.5 stars is a gamble I won't take.",
             ("rating", "review", "rated", "star", "reputation")),
        Pref("wheelchair", "wheelchair", "eq", True, "Wheelchair accessible.",
             "My father uses a wheelchair, so we need step-free access.",
             ("wheelchair", "accessible", "accessibility", "step", "stairs", "mobility")),
        Pref("late", "open_until", "ge", "23:00", "Open until 23:00 or later.",
             "We'll only sit down after a late show, so the kitchen has to keep serving until eleven at least.",
             ("late", "open", "closing", "close", "hours", "until")),
    ],
}
ALL_KEYWORDS = sorted({k for prefs in CATALOGUE.values() for p in prefs for k in p.keywords})
VAGUE_WORDS = ("prefer", "preference", "requirement", "need", "want", "like", "important", "looking for",
               "anything", "specific", "tell me", "wish", "expect", "care about")


def holds(pref: dict, option: dict) -> bool:
    """Does `option` meet `pref` ({attr, op, value})? Times are zero-padded "HH:MM" strings, so they compare."""
    return OPS[pref["op"]](option[pref["attr"]], pref["value"])


def misses(prefs: list, option: dict) -> list:
    """Ids of the preferences in `prefs` that `option` fails."""
    return [p["id"] for p in prefs if not holds(p, option)]


# ----------------------------------------------------------------------------------------------------------
# Scenario generation


class Infeasible(Exception):
    """The drawn preferences leave too few options of some kind; the generator draws again."""


def _draw(rng, sample, ok, tries=4000):
    for _ in range(tries):
        option = sample(rng)
        if ok(option):
            return option
    raise Infeasible


def _preferences(rng, aspect: str, k: int) -> list:
    pool = list(CATALOGUE[aspect])
    rng.shuffle(pool)
    chosen = []
    for p in pool:  # at most one preference per attribute, so two never contradict each other
        if len(chosen) < k and p.attr not in {c.attr for c in chosen}:
            chosen.append(p)
    out = []
    for p in chosen:
        v = rng.choice(p.choices) if p.choices else p.value
        out.append({"id": f"{aspect}.{p.name}", "attr": p.attr, "op": p.op, "value": v,
                    "text": p.text.format(v=v), "hint": p.hint.format(v=v), "keywords": list(p.keywords)})
    return out


def make_aspect(rng, aspect: str, arguments: dict, k: int) -> dict:
    """One aspect of a scenario: k preferences and its options with exact ground truth."""
    spec = ASPECTS[aspect]
    prefs = _preferences(rng, aspect, k)
    correct = [_draw(rng, spec.sample, lambda o: not misses(prefs, o)) for _ in range(rng.randint(2, 3))]
    # Near misses fail exactly one preference. One per preference is cheaper than the best, so an agent that
    # skips asking about any preference is lured by a cheaper option; some preferences get a second one.
    near = [(p["id"], True) for p in prefs] + [(p["id"], False) for p in prefs if rng.random() < 0.4]
    wrong = [_draw(rng, spec.sample, lambda o, i=i: misses(prefs, o) == [i]) for i, _ in near]
    noise = [_draw(rng, spec.sample, lambda o: len(misses(prefs, o)) >= min(2, k)) for _ in range(rng.randint(1, 3))]
    lo, hi = spec.prices
    used = set()

    def price(a, b):  # distinct integer prices, so "the cheapest" is never a tie
        while (p := rng.randint(a, b)) in used:
            pass
        used.add(p)
        return p

    best = price(lo + (hi - lo) // 4, lo + (hi - lo) // 2)
    priced = [("correct", correct[0], best)] + [("correct", o, price(best + 1, hi)) for o in correct[1:]]
    priced += [("wrong", o, price(lo, best - 1) if cheap else price(lo, hi)) for o, (_, cheap) in zip(wrong, near)]
    priced += [("noise", o, price(lo, hi)) for o in noise]
    numbers = rng.sample(range(1, 100), len(priced))
    options = [{"id": f"{spec.letter}{n}", **attrs, "price": p} for n, (_, attrs, p) in zip(numbers, priced)]
    ids = {"correct": [], "wrong": [], "noise": []}
    for o, (kind, _, _) in zip(options, priced):
        ids[kind].append(o["id"])
    best_id = options[0]["id"]  # priced first, at the lowest correct price
    rng.shuffle(options)
    return {"aspect": aspect, "arguments": arguments, "preferences": prefs, "options": options,
            "correct_ids": sorted(ids["correct"]), "best_id": best_id, "wrong_ids": sorted(ids["wrong"]),
            "noise_ids": sorted(ids["noise"])}


def pretty_date(iso: str) -> str:
    d = datetime.date.fromisoformat(iso)
    return f"{d.strftime('%B')} {d.day}"


REQUEST_PARTS = {
    "flight": "a flight from {origin} to {destination} on {date}",
    "hotel": "a hotel in {city} from {check_in} to {check_out}",
    "apartment": "an apartment in {city} from {check_in} to {check_out}",
    "car": "a rental car in {city} from {pickup_date} to {return_date}",
    "restaurant": "a table at a restaurant in {city} for dinner on {date}",
}
OPENERS = ["Hi! I'm planning a trip and I need {parts}.", "Hello, could you help me book {parts}?",
           "I'm travelling soon and still need {parts}.", "Hey there. I'm looking for {parts}."]
CLOSERS = ["My budget is tight, so for each of these please pick the cheapest option that works for me.",
           "Money is limited, so for each one I want the cheapest option that suits me.",
           "I'm watching my spending: for each, choose the cheapest option that fits what I need.",
           "Please keep costs down; for every item, the cheapest option that fits me is what I want."]


def make_scenario(rng, task_id: str) -> dict:
    """A whole task: a trip, its 2-4 aspects with 1-4 preferences each, and the user's vague opening."""
    origin, dest = rng.sample(CITIES, 2)
    start = datetime.date(2025, rng.randint(3, 10), rng.randint(1, 20))
    end = start + datetime.timedelta(days=rng.randint(2, 6))
    dinner = start + datetime.timedelta(days=rng.randint(0, (end - start).days - 1))
    s, e, d = start.isoformat(), end.isoformat(), dinner.isoformat()
    arguments = {"flight": {"origin": origin, "destination": dest, "date": s},
                 "hotel": {"city": dest, "check_in": s, "check_out": e},
                 "apartment": {"city": dest, "check_in": s, "check_out": e},
                 "car": {"city": dest, "pickup_date": s, "return_date": e},
                 "restaurant": {"city": dest, "date": d}}
    n = rng.randint(2, 4)
    while True:  # a budget of 16 turns: n searches, a failed search, one question per preference, one answer
        counts = [rng.randint(1, 4) for _ in range(n)]
        if sum(counts) <= 14 - n:
            break
    slots = sorted(rng.sample(range(4), n))  # keeps the order flight, lodging, car, restaurant
    names = [["flight", rng.choice(["hotel", "apartment"]), "car", "restaurant"][i] for i in slots]
    while True:
        try:
            aspects = [make_aspect(rng, a, arguments[a], k) for a, k in zip(names, counts)]
            break
        except Infeasible:
            continue
    parts = [REQUEST_PARTS[a["aspect"]].format(**{k: pretty_date(v) if re.fullmatch(r"\d{4}-\d\d-\d\d", v) else v
                                                for k, v in a["arguments"].items()}) for a in aspects]
    listed = ", ".join(parts[:-1]) + " and " + parts[-1]
    request = rng.choice(OPENERS).format(parts=listed) + " " + rng.choice(CLOSERS)
    return {"id": task_id, "structure": "".join(map(str, counts)), "request": request, "aspects": aspects,
            "best_ids": [a["best_id"] for a in aspects]}


def generate(split: str) -> list:
    seed, n = SPLITS[split]
    rng = random.Random(seed)
    first = 1 if split == "train" else SPLITS["train"][1] + 1  # ids never repeat across splits
    return [make_scenario(rng, f"travel-{first + i:04d}") for i in range(n)]


def dumps(tasks: list) -> str:
    return "".join(json.dumps(t, ensure_ascii=False, separators=(",", ":")) + "\n" for t in tasks)


# ----------------------------------------------------------------------------------------------------------
# Scripted rules for the three roles. Each returns what its prompt asks an LLM to return.


def mentions(text: str, keywords) -> bool:
    # whole words, a plural allowed ("bags" mentions "bag")
    return users.mentions(text, keywords, plural=True)


MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
MONTH_RE = r"\b(jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?"


def dates_in(text: str) -> set:
    """Every (month, day) written in `text` as 2025-04-10, April 10, Apr 10th, 10 April, or a range such as
    April 10-14, April 10 to 14 or 10-14 April."""
    text = text.lower()
    found = {(int(m), int(d)) for m, d in re.findall(r"\b\d{4}-(\d{1,2})-(\d{1,2})\b", text)}
    day = r"(\d{1,2})(?:st|nd|rd|th)?\b"
    until = r"\s*(?:-|–|to|until|through|till)\s*"
    for m, d, d2 in re.findall(MONTH_RE + r"\s+" + day + f"(?:{until}{day})?", text):
        found |= {(MONTHS.index(m) + 1, int(x)) for x in (d, d2) if x}
    for d, d2, m in re.findall(r"\b" + day + f"(?:{until}{day})?" + r"\s+(?:of\s+)?" + MONTH_RE, text):
        found |= {(MONTHS.index(m) + 1, int(x)) for x in (d, d2) if x}
    return found


def states(query: str, value: str) -> bool:
    if re.fullmatch(r"\d{4}-\d\d-\d\d", value):
        d = datetime.date.fromisoformat(value)
        return (d.month, d.day) in dates_in(query)
    return mentions(query, [value])


def search_judge_rule(query: str, arguments: dict) -> str:
    """{"aspect": name} when the query asks for exactly one of the trip's aspects and states every one of its
    arguments (a flight's origin before its destination); else {"aspect": null}."""
    asked = [a for a in arguments if mentions(query, ASPECTS[a].words)]
    if len(asked) != 1:
        return json.dumps({"aspect": None})
    aspect, args = asked[0], arguments[asked[0]]
    ok = all(states(query, v) for v in args.values())
    if ok and aspect == "flight":
        ok = query.lower().find(args["origin"].lower()) < query.lower().find(args["destination"].lower())
    return json.dumps({"aspect": aspect if ok else None})


def question_judge_rule(question: str, preferences: list) -> str:
    """Type 2 (with the preference id) when the question touches a keyword of a preference the user still
    holds; 3 when it touches a keyword of any other preference in the catalogue; 4 when it only asks in
    general; 1 otherwise. Ties go to a preference of the aspect the question names, then to list order."""
    hits = [p for p in preferences if mentions(question, p["keywords"])]
    if hits:
        named = [p for p in hits if mentions(question, ASPECTS[p["id"].split(".")[0]].words)]
        return json.dumps({"type": 2, "preference": (named or hits)[0]["id"]})
    if mentions(question, ALL_KEYWORDS):
        return json.dumps({"type": 3, "preference": None})
    if mentions(question, VAGUE_WORDS) or any(mentions(question, a.words) for a in ASPECTS.values()):
        return json.dumps({"type": 4, "preference": None})
    return json.dumps({"type": 1, "preference": None})


CHAT_REPLIES = ["Sounds good to me.", "Sure, thanks for helping.", "Okay, I appreciate it."]


def user_rule(mode: str, question: str, hint: str = "") -> str:
    """The traveller: says the hint when revealing, brings it up unasked when volunteering, else small talk."""
    if mode == "reveal":
        return hint
    if mode == "volunteer":
        return "Oh, and one more thing: " + hint[0].lower() + hint[1:]
    return CHAT_REPLIES[len(question) % len(CHAT_REPLIES)]


# ----------------------------------------------------------------------------------------------------------
# Prompts for LLM backends of the same roles


def search_judge_messages(query: str, arguments: dict) -> list:
    return [{"role": "system", "content":
             "You check search queries sent to a travel booking database. A query is valid for one trip aspect "
             "when it asks for that aspect only and states every required detail of it correctly (cities, and "
             "dates in any common format); for a flight the origin and destination must not be swapped."},
            {"role": "user", "content":
             f"The trip's aspects and the details a search must state:\n{json.dumps(arguments, indent=1)}\n\n"
             f"Query: {query}\n\nReply with a JSON object only: {{\"aspect\": \"<aspect name>\"}} if the query is "
             "valid for exactly one aspect, otherwise {\"aspect\": null}."}]


def history_text(history: list) -> str:
    """The conversation so far, one "Speaker: text" line per message, for the judge's and the traveller's prompts
    (the original passes both the conversation history)."""
    return "\n".join(f"{who}: {text}" for who, text in history) or "(nothing yet)"


def question_judge_messages(question: str, preferences: list, request: str = "", history: list = ()) -> list:
    listed = "\n".join(f"- {p['id']}: {p['text']}" for p in preferences) or "(none left)"
    return [{"role": "system", "content":
             "You classify what a travel assistant just said to a traveller whose preferences are hidden."},
            {"role": "user", "content":
             f"The traveller's request: {request}\n\nThe conversation so far:\n{history_text(history)}\n\n"
             f"The traveller's remaining preferences:\n{listed}\n\nThe assistant now said: {question}\n\n"
             "Types: 1 = small talk or anything that is not a question about preferences; 2 = a concrete "
             "question about one of the preferences listed; 3 = a concrete question about some preference "
             "that is not listed; 4 = a vague or general question (such as 'what do you prefer?').\n"
             "Reply with a JSON object only: {\"type\": <1-4>, \"preference\": \"<id for type 2, else null>\"}."}]


def user_messages(mode: str, question: str, hint: str = "", history: list = ()) -> list:
    task = {"reveal": f"Answer it by conveying this about yourself, indirectly and in your own words, keeping "
                      f"every number and name in it: {hint}",
            "volunteer": f"Reply briefly, then bring this up on your own, indirectly, keeping every number and "
                         f"name in it: {hint}",
            "chat": "Reply briefly and politely, without revealing any preference of yours."}[mode]
    return [{"role": "system", "content":
             "You are a traveller chatting with a travel assistant. Speak casually in the first person, in one "
             "or two sentences. Never list requirements and never mention that you have hidden preferences."},
            {"role": "user", "content": f"The conversation so far:\n{history_text(history)}\n\n"
                                        f"The assistant now said: {question}\n\n{task}"}]


# ----------------------------------------------------------------------------------------------------------
# One episode


NO_PREFERENCE = "I don't have any particular preference about that."
TOO_VAGUE = "That's a bit broad for me; could you ask about something more specific?"
SEARCH_FAILED = "The search backend is having issues right now. Please try again."
ID_RE = re.compile(r"[ACFHR]\d+")


class TravelSession:
    """The mechanics of one TravelGym episode. `user` plays the three roles through `act(role, messages,
    **facts)`. Each of search / talk / answer returns (observation, reward, done)."""

    def __init__(self, task: dict, user, search_reward: float = 0.0, preference_reward: float = 0.8,
                 failure_interval: int = 5, volunteer_after: int = 3):
        self.task, self.user = task, user
        self.search_reward, self.preference_reward = search_reward, preference_reward
        self.failure_interval, self.volunteer_after = failure_interval, volunteer_after
        self.aspects = {a["aspect"]: a for a in task["aspects"]}
        self.arguments = {name: a["arguments"] for name, a in self.aspects.items()}
        self.remaining = [p for a in task["aspects"] for p in a["preferences"]]
        self.searched, self.searches, self.quiet_turns = set(), 0, 0
        self.chosen = {}  # aspect -> (option id, reward)
        self.history = []  # (speaker, text): what the judge and an LLM traveller see of the conversation so far

    def search(self, query: str):
        obs, reward = self._search(query)
        self.history += [("Assistant (search)", query), ("Database", obs.split("\n")[0])]  # results not repeated
        return obs, reward, False

    def _search(self, query: str):
        self.searches += 1
        if self.searches % self.failure_interval == 0:  # on purpose, as in the original: agents must retry
            return SEARCH_FAILED, 0.0
        reply = self.user.act("travel.search_judge", search_judge_messages(query, self.arguments),
                              rule=search_judge_rule, query=query, arguments=self.arguments)
        aspect = (users.extract_json(reply) or {}).get("aspect")
        if not isinstance(aspect, str) or aspect not in self.aspects:
            return ("No results. Search for one thing at a time and state all of its details, e.g. a flight's "
                    "origin, destination and date, or a hotel's city and check-in and check-out dates."), 0.0
        if aspect in self.searched:
            return f"You have already searched for the {aspect}; its options are in the earlier results.", 0.0
        self.searched.add(aspect)
        a = self.aspects[aspect]
        lines = [json.dumps(o, separators=(",", ":")) for o in a["options"]]
        head = f"{len(lines)} {aspect} options (price in {ASPECTS[aspect].unit}), one JSON object per line:"
        return "\n".join([head, *lines]), self.search_reward

    def talk(self, message: str):
        obs, reward = self._talk(message)
        self.history += [("Assistant", message), ("Traveller", obs)]
        return obs, reward, False

    def _talk(self, message: str):
        judged = question_judge_messages(message, self.remaining, self.task["request"], self.history)
        reply = self.user.act("travel.question_judge", judged, rule=question_judge_rule, question=message,
                              preferences=self.remaining)
        verdict = users.extract_json(reply) or {}
        kind = str(verdict.get("type", "")).strip()  # models write 2 or "2"
        pref = next((p for p in self.remaining if p["id"] == verdict.get("preference")), None)
        if kind == "2" and pref is not None:
            self.remaining.remove(pref)
            self.quiet_turns = 0
            return self._say("reveal", message, pref["hint"]), self.preference_reward
        self.quiet_turns += 1
        if kind in ("2", "3"):  # type 2 naming no preference the user holds counts as 3
            obs = NO_PREFERENCE
        elif kind == "4":
            obs = TOO_VAGUE
        else:
            obs = self._say("chat", message)
        if self.quiet_turns >= self.volunteer_after and self.remaining:
            # The original volunteers a random preference; the first remaining one keeps episodes reproducible.
            pref = self.remaining.pop(0)
            self.quiet_turns = 0
            obs += " " + self._say("volunteer", message, pref["hint"])
        return obs, 0.0

    def _say(self, mode: str, question: str, hint: str = "") -> str:
        return self.user.act("travel.user", user_messages(mode, question, hint, self.history), rule=user_rule,
                             mode=mode, question=question, hint=hint)

    def answer(self, content: str):
        tokens = [t for t in re.split(r"[,\s]+", content.strip()) if t]  # case matters, as in the original
        bad = [t for t in tokens if not ID_RE.fullmatch(t)]
        if bad or not tokens or len(tokens) > len(ASPECTS):
            shown = f"{bad[0][:30]!r} is not an option id" if bad else "give one option id per aspect"
            # The format is described, not exemplified: an example id could be this task's best option.
            return (f"Error: {shown}. Answer with option ids as the search results list them (a letter and a "
                    "number), comma-separated, at most one per aspect."), 0.0, False
        lines, reward, recorded = [], 0.0, []
        for oid in tokens:
            aspect = next((a for a in self.aspects.values() if any(o["id"] == oid for o in a["options"])), None)
            known = aspect is not None  # as the original, a well-formed id it does not know is a wrong choice
            aspect = aspect or next((a for a in self.aspects.values() if ASPECTS[a["aspect"]].letter == oid[0]), None)
            if aspect is None:
                lines.append(f"{oid} is not among the options of this trip, which has no such part.")
                continue
            if aspect["aspect"] in self.chosen:
                # As the original: the answer stops at this id and earns nothing; the ids before it stay chosen,
                # worth 0 in the score as well (the original's metric reads this turn's reward, 0).
                for name in recorded:
                    self.chosen[name] = (self.chosen[name][0], 0.0)
                lines.append(f"{oid}: you already chose {self.chosen[aspect['aspect']][0]} for the "
                             f"{aspect['aspect']}; only one choice per aspect is allowed, so this answer stops here "
                             "and earns nothing.")
                return " ".join(lines), 0.0, self.all_best()
            r = (BEST_REWARD if oid == aspect["best_id"] else
                 CORRECT_REWARD if oid in aspect["correct_ids"] else 0.0)
            self.chosen[aspect["aspect"]] = (oid, r)
            recorded.append(aspect["aspect"])
            # A chosen aspect's preferences are no longer up for discussion (the original removes them too).
            self.remaining = [p for p in self.remaining if not p["id"].startswith(aspect["aspect"] + ".")]
            reward += r
            if not known:
                lines.append(f"{oid} is not among the options of this trip: a wrong choice for the "
                             f"{aspect['aspect']}, which is now closed.")
                continue
            # as the original's feedback, say how good the choice was (it cannot be changed any more)
            verdict = ("the best option" if r == BEST_REWARD else "it fits but is not the cheapest that does"
                       if r else "it misses a preference")
            lines.append(f"Recorded {oid} as your choice for the {aspect['aspect']}: {verdict}.")
        return " ".join(lines), max(reward, 0.0), self.all_best()

    def all_best(self) -> bool:
        """Has the best option of every aspect been chosen? (The original's async step ends only then.)"""
        return all(self.chosen.get(name, (None,))[0] == a["best_id"] for name, a in self.aspects.items())

    def score(self) -> float:
        """The evaluation metric: the reward of the option chosen per aspect (0 if none), averaged over aspects."""
        return sum(self.chosen.get(a, (None, 0.0))[1] for a in self.aspects) / len(self.aspects)


# ----------------------------------------------------------------------------------------------------------
# The gym

PROMPT = """You are a travel assistant booking a trip for a user. Their first message says what they need (for example a flight and a hotel) but not what matters to them: each part of the trip comes with preferences they have not told you. For every part, find the cheapest option that meets all of their preferences.

Call interact_with_env with one of these choices:
- search: query the booking database for ONE part of the trip and state all of its details, e.g. "flight from Boston to Denver on April 10" or "hotel in Denver from April 10 to April 14". You get every option for that part, one JSON object per line. Searching the same part again gives nothing new; when the database reports a problem, simply search again.
- action: say something to the user. Ask one concrete question at a time about a specific feature (departure time, stops, breakfast, parking...); vague questions such as "any preferences?" get you nowhere. The user tends to hint at a preference rather than state it, so read the replies carefully.
- answer: recommend option ids, e.g. "F12" or "F12, H3". Only your first choice for each part of the trip counts, and it closes that part.
Search first, then ask about the features that set the options apart, then choose.""" + FOOTER

# (search reward, preference reward) by eval_mode: the paper trains with 0.0 / 0.8 and evaluates with 0.2 / 0.6.
REWARDS = {False: (0.0, 0.8), True: (0.2, 0.6)}
# The original ships one file per structure (digits = preferences per aspect) and names the car "rental_car".
STRUCTURES = ("22", "33", "44", "233", "333", "334", "444", "2222")
ORIGINAL_ASPECTS = {"flight": "flight", "hotel": "hotel", "apartment": "apartment", "rental_car": "car",
                    "restaurant": "restaurant"}
BUDGET_NOTE = "Money is tight, so for each of these I'd like the cheapest option that still suits me."
NOUNS = {"flight": "flight", "hotel": "hotel", "apartment": "apartment", "car": "rental car",
         "restaurant": "restaurant"}
QUERIES = {  # the expert's search phrasings; each states every argument of its aspect
    "flight": ["flight from {origin} to {destination} on {date}", "{origin} to {destination} flights on {date}",
               "Search flights from {origin} to {destination}, departing {date}"],
    "hotel": ["hotel in {city} from {check_in} to {check_out}",
              "hotels in {city}, check-in {check_in}, check-out {check_out}"],
    "apartment": ["apartment in {city} from {check_in} to {check_out}",
                  "apartments in {city} for {check_in} until {check_out}"],
    "car": ["rental car in {city} from {pickup_date} to {return_date}",
            "car rental in {city}, pick up {pickup_date}, return {return_date}"],
    "restaurant": ["restaurant in {city} on {date}", "restaurants in {city} for dinner on {date}"],
}
QUESTIONS = ["For the {noun}, how do you feel about {kw}?", "Is {kw} important to you for the {noun}?",
             "What about {kw} for the {noun}: does it matter to you?",
             "Regarding the {noun}, what do you think about {kw}?"]


def date_forms(value: str) -> list:
    """Ways of writing an ISO date that the search judge reads: 2025-04-10, April 10, Apr 10th, 10 April."""
    if not re.fullmatch(r"\d{4}-\d\d-\d\d", value):
        return [value]
    d = datetime.date.fromisoformat(value)
    suffix = "th" if 10 <= d.day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(d.day % 10, "th")
    return [value, pretty_date(value), f"{d.strftime('%b')} {d.day}{suffix}", f"{d.day} {d.strftime('%B')}"]


class TravelGym(Env):
    name = "travel"
    choices = ("search", "action", "answer")
    fields = {"id": str, "request": str, "aspects": list}
    system_prompt = PROMPT
    original_files = tuple(f"travelgym_data_{s}.json" for s in STRUCTURES)

    def __init__(self, task, user=None, search_reward: float | None = None, preference_reward: float | None = None,
                 **kwargs):
        super().__init__(task, user, **kwargs)
        train_or_eval = REWARDS[bool(self.eval_mode)]
        self.search_reward = train_or_eval[0] if search_reward is None else search_reward
        self.preference_reward = train_or_eval[1] if preference_reward is None else preference_reward
        self.session = self._session()  # here too, so that episode_score() is defined before reset()

    @classmethod
    def check_task(cls, task):
        super().check_task(task)
        for i, a in enumerate(task["aspects"]):
            keys = ("aspect", "arguments", "preferences", "options", "correct_ids", "best_id")
            if not isinstance(a, dict) or any(k not in a for k in keys):
                raise ValueError(f"field 'aspects': item {i} must be an object with {', '.join(keys)}")
            if a["aspect"] not in ASPECTS or a["best_id"] not in [o.get("id") for o in a["options"]]:
                raise ValueError(f"field 'aspects': item {i} has an unknown aspect or a best_id that is not an option")

    def _session(self):
        return TravelSession(self.task, self.user, search_reward=self.search_reward,
                             preference_reward=self.preference_reward)

    def opening(self):
        self.session = self._session()
        return self.task["request"]

    def act(self, choice, content):
        s = self.session
        return {"search": s.search, "action": s.talk, "answer": s.answer}[choice](content)

    def episode_score(self):
        # The paper reports, per aspect, the reward of the option chosen (best 1, correct 0.8), averaged over
        # aspects: searches and elicited preferences earn turn rewards but are not part of the score.
        return self.session.score()

    def expert_action(self, rng):
        """Search every aspect with all its details (again after the deliberate failure), ask about each of its
        preferences with one concrete question, and choose its best option: aspect by aspect or searching
        everything first, answering each aspect at once or all at the end, as the turns allow. Full reward: a
        score of 1, every best option chosen."""
        s = self.session
        if self.plan is None:
            order = [a["aspect"] for a in self.task["aspects"]]
            if rng.random() < 0.3:
                rng.shuffle(order)
            self.plan = {"order": order, "search_first": rng.random() < 0.4, "answer_each": rng.random() < 0.5}
        open_ = [a for a in self.plan["order"] if a not in s.chosen]
        if not open_:  # every aspect has a choice, not all of them the best: nothing left to gain
            return expert_turn("Every part of the trip has a choice; nothing is left to do.", "finish", "")
        unsearched = [a for a in open_ if a not in s.searched]
        asks = {a: [p for p in s.remaining if p["id"].startswith(a + ".")] for a in open_}
        work = len(unsearched) + sum(map(len, asks.values()))
        ready = [a for a in open_ if a in s.searched and not asks[a]]
        # answering aspect by aspect costs a turn per aspect; fall back to one answer when turns run short
        each = self.plan["answer_each"] and work + len(open_) <= self.turns_left()
        if self.turns_left() <= 1 or not work or (each and ready):
            return self._expert_answer(rng, open_ if self.turns_left() <= 1 or not work else ready[:1])
        if self.plan["search_first"] and unsearched:
            return self._expert_search(rng, unsearched[0])
        aspect = next(a for a in open_ if a in unsearched or asks[a])
        if aspect in unsearched:
            return self._expert_search(rng, aspect)
        return self._expert_ask(rng, aspect, rng.choice(asks[aspect]))

    def _expert_search(self, rng, aspect):
        args = self.session.arguments[aspect]
        dated = {k: rng.choice(date_forms(v)) for k, v in args.items()}
        forms = [q.format(**dated) for q in QUERIES[aspect] if set(re.findall(r"{(\w+)}", q)) == set(args)]
        plain = f"{NOUNS[aspect]} " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in dated.items())  # any arguments
        query = pick(rng, forms, lambda q: json.loads(search_judge_rule(q, self.session.arguments))["aspect"] == aspect,
                     default=plain)
        again = self.session.searches % self.session.failure_interval == 0 and self.session.searches > 0
        think = ("The database had a problem; the same search again." if again and aspect not in self.session.searched
                 else rng.choice([f"I need the {NOUNS[aspect]} options: search with every detail from the request.",
                                  f"Next, the {NOUNS[aspect]}. One search, all of its details.",
                                  f"Let me look up the {NOUNS[aspect]} options first."]))
        return expert_turn(think, "search", query)

    def _expert_ask(self, rng, aspect, pref):
        noun = NOUNS[aspect]
        forms = [q.format(noun=noun, kw=kw) for q in QUESTIONS for kw in pref["keywords"][:2]]  # the plainest words

        def reveals(q):  # the question judge takes it as a question about this very preference
            return json.loads(question_judge_rule(q, self.session.remaining)).get("preference") == pref["id"]

        question = pick(rng, forms, reveals, default=forms[0] if forms else f"What matters to you about the {noun}?")
        think = rng.choice([f"The {noun} options differ in many ways; find out which ones matter to them.",
                            f"Before choosing the {noun}, find out what matters to them. One concrete question.",
                            f"Ask about one feature of the {noun} at a time."])
        return expert_turn(think, "action", question)

    def _expert_answer(self, rng, aspects):
        ids = [self.session.aspects[a]["best_id"] for a in aspects]
        which = " and ".join(f"{i} for the {NOUNS[a]}" for i, a in zip(ids, aspects))
        think = rng.choice([f"Cheapest options that meet every preference I heard: {which}.",
                            f"Checking the options against what they told me: {which}.",
                            f"{which[0].upper() + which[1:]}: each fits all their preferences at the lowest price."])
        return expert_turn(think, "answer", rng.choice([", ", " "]).join(ids))

    @classmethod
    def load_original(cls, data_dir, split):
        """Every `travelgym_data_<structure>.json` in `data_dir`, each split 85 / 15 as the original's
        preprocessing does (a seeded shuffle per file: the same proportions, not the same rows)."""
        paths = [data_dir / f for f in cls.original_files if (data_dir / f).is_file()]
        if not paths:
            cls.original_path(data_dir)  # raises, naming the files it expected
        out = []
        for path in paths:
            tasks = cls.read_original(path)
            out += seeded_split(tasks, split, round(len(tasks) * 0.15))
        return out

    @classmethod
    def read_original(cls, path):
        """An original file is one JSON object of scenarios keyed by id (e.g. "flight:2-37|hotel:2-9")."""
        try:
            scenarios = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise TaskDataError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(scenarios, dict):
            raise TaskDataError(f"{path}: expected a JSON object of travel scenarios keyed by id")
        return [cls.convert({**record, "id": key} if isinstance(record, dict) else record, f"{path}: scenario {key!r}")
                for key, record in scenarios.items()]

    @staticmethod
    def from_original(record):
        """`{initial_description, dimensions, <dimension>: {preferences: [[aspect, subcategory, text, implicit
        statement, ...]], arguments, options: {correct, wrong, noise}, correct_ids, best_id}}` as a travel task.
        The preferences carry no keywords: with the scripted user they are only ever volunteered, so play these
        tasks with an LLM user."""
        aspects = []
        for dim in record["dimensions"]:
            d, name = record[dim], ORIGINAL_ASPECTS[dim]
            # the original drops its annotations and shuffles the options at load time; a seed fixes our order
            options = [{k: v for k, v in o.items() if k not in ("type", "reason")}
                       for kind in ("correct", "wrong", "noise") for o in d["options"].get(kind, [])]
            random.Random(f"{record['id']}/{dim}").shuffle(options)
            ids = [o["id"] for o in options]
            if not all(isinstance(i, str) for i in ids) or d["best_id"] not in ids or not set(d["correct_ids"]) <= set(ids):
                raise ValueError(f"{dim}: best_id and correct_ids must be ids of its options")
            prefs = [{"id": f"{name}.p{i}", "text": p[2], "hint": p[3], "keywords": []}
                     for i, p in enumerate(d["preferences"], 1)]
            if not all(isinstance(p[k], str) and p[k] for p in prefs for k in ("text", "hint")):
                raise ValueError(f"{dim}: every preference needs its text and implicit statement")
            # the scripted search judge matches argument values as text
            arguments = {k: v if isinstance(v, str) else json.dumps(v) for k, v in d["arguments"].items()}
            aspects.append({"aspect": name, "arguments": arguments, "preferences": prefs, "options": options,
                            "correct_ids": list(d["correct_ids"]), "best_id": d["best_id"]})
        if not aspects:
            raise ValueError("no dimensions")
        return {"id": record["id"], "structure": "".join(str(len(a["preferences"])) for a in aspects),
                "request": f"{record['initial_description'].strip()} {BUDGET_NOTE}", "aspects": aspects,
                "best_ids": [a["best_id"] for a in aspects]}


if __name__ == "__main__":
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        text = dumps(generate(split))
        (DATA_DIR / f"{split}.jsonl").write_text(text, encoding="utf-8")
        print(f"{DATA_DIR / split}.jsonl: {SPLITS[split][1]} tasks, {len(text) / 1e6:.2f} MB", file=sys.stderr)
