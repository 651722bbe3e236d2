"""Writes benchmarks/data/tool_calls_{train,heldout}.jsonl: the tool-calling conversations on
which the demo model is fine-tuned and scored (`mistral_nemo.eval.tool_calls`).

    python benchmarks/make_tool_data.py [--check]

One conversation a line, in OpenAI's format: `{"tools": [...], "messages": [...]}` with 2 to 6
of the twelve tools below offered, an optional system message, the user's request, the
assistant's tool calls (ids of 9 letters or digits, arguments as a JSON string), one tool
result per call and the assistant's final answer. Most requests need one call, some need two
parallel calls, and some need none: a general question, or a request for a tool that is not
offered, which the assistant answers in text.

Held out: every fourth phrasing template and every fourth value of each pool (cities, amounts,
dates, ...) is reserved for the held-out file, so held-out requests are worded differently and
ask about values training never saw; no user message appears in both files. The script is
the source and seeded: `--check` rebuilds both files and fails if they differ.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benchmarks" / "data"
FILES = {"train": DATA / "tool_calls_train.jsonl", "heldout": DATA / "tool_calls_heldout.jsonl"}
SEED = 2407
# Conversations of each kind per split: one call, two parallel calls, a request for a tool
# that is not offered, a question no tool is for.
COUNTS = {
    "train": {"single": 170, "parallel": 36, "missing_tool": 22, "general": 12},
    "heldout": {"single": 42, "parallel": 9, "missing_tool": 5, "general": 4},
}
SYSTEM_SHARE = 0.35  # conversations that open with a system message
# How many tools a conversation offers, 2 to 6: mostly few, which keeps prompts short.
TOOL_COUNTS = (2, 2, 3, 3, 3, 4, 4, 5, 6)

T = TypeVar("T")


def share(values: Sequence[T], split: str) -> list[T]:
    """The part of a pool a split draws from: every fourth item is held out."""
    return [v for i, v in enumerate(values) if (i % 4 == 3) == (split == "heldout")]


@dataclass(frozen=True)
class Slot:
    """An argument as the user says it: its value in the call and its words in the request."""

    value: Any
    text: str


def same(value: Any) -> Slot:
    return Slot(value, f"{value:g}" if isinstance(value, float) else str(value))


def long_date(iso: str) -> str:
    d = date.fromisoformat(iso)
    return f"{d:%B} {d.day}, {d.year}"


def twelve_hour(hhmm: str) -> str:
    hour, minute = map(int, hhmm.split(":"))
    clock = f"{hour % 12 or 12}:{minute:02d}" if minute else str(hour % 12 or 12)
    return f"{clock} {'am' if hour < 12 else 'pm'}"


def spoken_seconds(seconds: int) -> str:
    parts = []
    for size, unit in ((3600, "hour"), (60, "minute"), (1, "second")):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count} {unit}{'s' if count > 1 else ''}")
    return " ".join(parts)


def date_slot(rng: random.Random, split: str) -> Slot:
    iso = rng.choice(share(DATES, split))
    return Slot(iso, rng.choice([iso, long_date(iso)]))


def time_slot(rng: random.Random, split: str) -> Slot:
    hhmm = rng.choice(share(TIMES, split))
    return Slot(hhmm, rng.choice([hhmm, twelve_hour(hhmm)]))


def string_param(description: str, **schema: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **schema}


def integer_param(description: str, **schema: Any) -> dict[str, Any]:
    return {"type": "integer", "description": description, **schema}


def number_param(description: str, **schema: Any) -> dict[str, Any]:
    return {"type": "number", "description": description, **schema}


def enum_param(description: str, values: Sequence[str]) -> dict[str, Any]:
    return {"type": "string", "description": description, "enum": list(values)}


DATE_PARAM = string_param("Date as YYYY-MM-DD", pattern=r"^\d{4}-\d{2}-\d{2}$")
TIME_PARAM = string_param("24-hour time as HH:MM", pattern=r"^\d{2}:\d{2}$")
DATES = [(date(2026, 1, 6) + timedelta(days=9 * i)).isoformat() for i in range(40)]
TIMES = [
    "08:00", "08:30", "09:00", "09:15", "10:00", "10:30", "11:00", "11:45", "12:30", "13:00",
    "14:00", "14:30", "15:00", "15:30", "16:00", "16:45", "17:30", "18:00", "19:00", "19:30",
]  # fmt: skip


@dataclass(frozen=True, eq=False)  # a tool is itself: compared and hashed by identity
class Tool:
    """A function the assistant may call, and how to make conversations about it."""

    name: str
    description: str
    properties: dict[str, dict[str, Any]]
    required: tuple[str, ...]
    capability: str  # what the tool does, as an assistant without it would say it can't
    requests: tuple[str, ...]  # phrasings; `{argument}` stands for an argument's words
    draw: Callable[[random.Random, str], dict[str, Slot]]  # every argument, required or not
    result: Callable[[random.Random, dict[str, Any]], dict[str, Any]]  # the tool's answer
    answer: Callable[[dict[str, Any], dict[str, Any]], str]  # from arguments and result

    @property
    def schema(self) -> dict[str, Any]:
        parameters = {
            "type": "object",
            "properties": self.properties,
            "required": list(self.required),
        }
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": parameters,
            },
        }

    def request(self, rng: random.Random, split: str) -> tuple[str, dict[str, Any]]:
        """A user request and the arguments of the call that answers it: those the request
        mentions, in the schema's order."""
        template = rng.choice(share(self.requests, split))
        slots = self.draw(rng, split)
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
        text = template.format(**{name: slots[name].text for name in fields})
        return text, {name: slots[name].value for name in self.properties if name in fields}


# --- weather ---------------------------------------------------------------------------------

CITIES = [
    "Lisbon", "Oslo", "Nairobi", "Toronto", "Buenos Aires", "Seoul", "Reykjavik", "Cairo",
    "Vancouver", "Melbourne", "Prague", "Lima", "Helsinki", "Singapore", "Denver", "Istanbul",
    "Dublin", "Hanoi", "Warsaw", "Santiago", "Cape Town", "Montreal", "Kyoto", "Edinburgh",
]  # fmt: skip
CONDITIONS = ["clear skies", "light rain", "overcast skies", "scattered clouds", "fog", "drizzle"]


def draw_weather(rng: random.Random, split: str) -> dict[str, Slot]:
    unit = rng.choice(["celsius", "fahrenheit"])
    return {"location": same(rng.choice(share(CITIES, split))), "unit": Slot(unit, unit.title())}


def weather_result(rng: random.Random, args: dict[str, Any]) -> dict[str, Any]:
    unit = args.get("unit", "celsius")
    celsius = rng.randint(-5, 33)
    temperature = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32)
    return {
        "location": args["location"],
        "temperature": temperature,
        "unit": unit,
        "conditions": rng.choice(CONDITIONS),
    }


def weather_answer(args: dict[str, Any], result: dict[str, Any]) -> str:
    symbol = "°C" if result["unit"] == "celsius" else "°F"
    return (
        f"It's {result['temperature']}{symbol} with {result['conditions']} in "
        f"{result['location']} right now."
    )


WEATHER = Tool(
    name="get_current_weather",
    description="Get the current weather in a city.",
    properties={
        "location": string_param("City name, e.g. Paris"),
        "unit": enum_param("Temperature unit (default celsius)", ["celsius", "fahrenheit"]),
    },
    required=("location",),
    capability="check the weather",
    requests=(
        "What's the weather like in {location} right now?",
        "How's the weather in {location}?",
        "Is it raining in {location}?",
        "Tell me the current temperature in {location} in {unit}.",
        "Can you check the weather in {location} for me?",
        "I'm heading out in {location}. What are the conditions like?",
        "Weather in {location}, please, in {unit}.",
        "Give me the current weather for {location}.",
        "How cold is it in {location} at the moment? Use {unit}.",
        "Do I need a jacket in {location} today? Check the weather.",
        "Current conditions in {location}?",
        "What temperature is it in {location}, in degrees {unit}?",
    ),
    draw=draw_weather,
    result=weather_result,
    answer=weather_answer,
)

# --- unit conversion -------------------------------------------------------------------------

CONVERSIONS: dict[tuple[str, str], Callable[[float], float]] = {
    ("kilometers", "miles"): lambda x: x / 1.609344,
    ("miles", "kilometers"): lambda x: x * 1.609344,
    ("meters", "feet"): lambda x: x / 0.3048,
    ("feet", "meters"): lambda x: x * 0.3048,
    ("kilograms", "pounds"): lambda x: x / 0.45359237,
    ("pounds", "kilograms"): lambda x: x * 0.45359237,
    ("liters", "gallons"): lambda x: x / 3.785411784,
    ("gallons", "liters"): lambda x: x * 3.785411784,
    ("celsius", "fahrenheit"): lambda x: x * 9 / 5 + 32,
    ("fahrenheit", "celsius"): lambda x: (x - 32) * 5 / 9,
    ("centimeters", "inches"): lambda x: x / 2.54,
    ("inches", "centimeters"): lambda x: x * 2.54,
}
UNITS = sorted({unit for pair in CONVERSIONS for unit in pair})
QUANTITIES = [
    3, 5, 7.5, 10, 12, 15, 18, 20, 21.5, 25, 30, 42,
    50, 60, 75, 100, 120, 150, 180, 200, 250, 300, 500, 1000,
]  # fmt: skip


def draw_conversion(rng: random.Random, split: str) -> dict[str, Slot]:
    source, target = rng.choice(list(CONVERSIONS))
    return {
        "value": same(rng.choice(share(QUANTITIES, split))),
        "from_unit": same(source),
        "to_unit": same(target),
    }


def conversion_result(rng: random.Random, args: dict[str, Any]) -> dict[str, Any]:
    convert = CONVERSIONS[args["from_unit"], args["to_unit"]]
    return {"value": round(convert(args["value"]), 2), "unit": args["to_unit"]}


def conversion_answer(args: dict[str, Any], result: dict[str, Any]) -> str:
    return f"{args['value']:g} {args['from_unit']} is about {result['value']:g} {result['unit']}."


CONVERT_UNITS = Tool(
    name="convert_units",
    description="Convert a quantity from one unit of measurement to another.",
    properties={
        "value": number_param("The quantity to convert"),
        "from_unit": enum_param("Unit of the quantity", UNITS),
        "to_unit": enum_param("Unit to convert to", UNITS),
    },
    required=("value", "from_unit", "to_unit"),
    capability="convert units of measurement",
    requests=(
        "Convert {value} {from_unit} to {to_unit}.",
        "How many {to_unit} is {value} {from_unit}?",
        "What is {value} {from_unit} in {to_unit}?",
        "I need {value} {from_unit} expressed in {to_unit}.",
        "Can you turn {value} {from_unit} into {to_unit}?",
        "{value} {from_unit} to {to_unit}, please.",
        "Please convert {value} {from_unit} into {to_unit} for me.",
        "How much is {value} {from_unit} in {to_unit}?",
        "Quick conversion: {value} {from_unit} in {to_unit}?",
        "I measured {value} {from_unit}. What's that in {to_unit}?",
        "Express {value} {from_unit} as {to_unit}.",
        "What do {value} {from_unit} come to in {to_unit}?",
    ),
    draw=draw_conversion,
    result=conversion_result,
    answer=conversion_answer,
)

# --- calendar --------------------------------------------------------------------------------

EVENT_TITLES = [
    "Team standup", "Dentist appointment", "Lunch with Maria", "Quarterly review",
    "Yoga class", "Parent-teacher meeting", "Coffee with Sam", "Project kickoff",
    "Doctor's checkup", "Book club", "Car service", "Design review",
    "Piano lesson", "Budget planning", "Haircut", "Dinner with the Lees",
]  # fmt: skip
EVENT_PLACES = [
    "Room 4B", "the main office", "Cafe Aroma", "the community center",
    "Dr. Patel's clinic", "the library", "Studio 2", "the downtown branch",
]  # fmt: skip
EVENT_MINUTES = [
    (15, "15 minutes"), (20, "20 minutes"), (30, "30 minutes"), (45, "45 minutes"),
    (60, "1 hour"), (90, "90 minutes"), (120, "2 hours"), (180, "3 hours"),
]  # fmt: skip


def draw_event(rng: random.Random, split: str) -> dict[str, Slot]:
    minutes, spoken = rng.choice(share(EVENT_MINUTES, split))
    return {
        "title": same(rng.choice(share(EVENT_TITLES, split))),
        "date": date_slot(rng, split),
        "start_time": time_slot(rng, split),
        "duration_minutes": Slot(minutes, spoken),
        "location": same(rng.choice(share(EVENT_PLACES, split))),
    }


def event_result(rng: random.Random, args: dict[str, Any]) -> dict[str, Any]:
    return {"event_id": f"evt_{rng.randrange(10**5, 10**6)}", "status": "confirmed"}


def event_answer(args: dict[str, Any], result: dict[str, Any]) -> str:
    return (
        f'Done: "{args["title"]}" is on your calendar for {long_date(args["date"])} '
        f"at {args['start_time']}."
    )


CALENDAR = Tool(
    name="create_calendar_event",
    description="Add an event to the user's calendar.",
    properties={
        "title": string_param("Event title"),
        "date": DATE_PARAM,
        "start_time": TIME_PARAM,
        "duration_minutes": integer_param("Length in minutes (default 60)", minimum=5, maximum=480),
        "location": string_param("Where the event takes place"),
    },
    required=("title", "date", "start_time"),
    capability="add events to your calendar",
    requests=(
        'Add "{title}" to my calendar on {date} at {start_time}.',
        "Schedule {title} on {date} at {start_time} for {duration_minutes}.",
        "Put {title} in my calendar for {date}, starting at {start_time}, at {location}.",
        "Create a calendar event called {title} on {date} at {start_time}.",
        "Book {title} for {duration_minutes} on {date} at {start_time}.",
        "Can you block {start_time} on {date} for {title}?",
        "I have {title} on {date} at {start_time} at {location}. Add it to my calendar.",
        "New event: {title}, {date}, {start_time}, {duration_minutes}.",
        "Please schedule {title} at {location} on {date} from {start_time} for {duration_minutes}.",
        "Set up {title} on {date} at {start_time}.",
        "Add an event to my calendar: {title} on {date} at {start_time}, {duration_minutes} long.",
        "Make a calendar entry for {title} at {start_time} on {date} in {location}.",
    ),
    draw=draw_event,
    result=event_result,
    answer=event_answer,
)

# --- currency --------------------------------------------------------------------------------

USD_RATES = {
    "USD": 1.0, "EUR": 0.92, "GBP": 0.79, "JPY": 150.2, "CHF": 0.88, "CAD": 1.36,
    "AUD": 1.52, "SEK": 10.4, "INR": 83.2, "MXN": 17.1, "BRL": 5.0, "NZD": 1.65,
}  # fmt: skip
AMOUNTS = [
    20, 35, 50, 75, 80, 99.99, 120, 150, 200, 250,
    300, 450, 500, 750, 1000, 1200, 1500, 2000, 2500, 5000,
]  # fmt: skip


def draw_currency(rng: random.Random, split: str) -> dict[str, Slot]:
    source, target = rng.sample(list(USD_RATES), 2)
    return {
        "amount": same(rng.choice(share(AMOUNTS, split))),
        "from_currency": same(source),
        "to_currency": same(target),
    }


def currency_result(rng: random.Random, args: dict[str, Any]) -> dict[str, Any]:
    rate = USD_RATES[args["to_currency"]] / USD_RATES[args["from_currency"]]
    rate = round(rate * rng.uniform(0.99, 1.01), 4)
    return {
        "amount": round(args["amount"] * rate, 2),
        "currency": args["to_currency"],
        "rate": rate,
    }


def currency_answer(args: dict[str, Any], result: dict[str, Any]) -> str:
    return (
        f"{args['amount']:g} {args['from_currency']} is about {result['amount']:,.2f} "
        f"{result['currency']} at a rate of {result['rate']}."
    )


CURRENCY_PARAM = string_param("ISO 4217 code of the amount's currency", pattern="^[A-Z]{3}$")
CURRENCY = Tool(
    name="convert_currency",
    description="Convert an amount of money between currencies at today's exchange rate.",
    properties={
        "amount": number_param("Amount of money", exclusiveMinimum=0),
        "from_currency": CURRENCY_PARAM,
        "to_currency": {**CURRENCY_PARAM, "description": "ISO 4217 code of the currency wanted"},
    },
    required=("amount", "from_currency", "to_currency"),
    capability="convert currencies",
    requests=(
        "Convert {amount} {from_currency} to {to_currency}.",
        "How much is {amount} {from_currency} in {to_currency}?",
        "What's {amount} {from_currency} worth in {to_currency} today?",
        "I have {amount} {from_currency}. How many {to_currency} is that?",
        "Exchange {amount} {from_currency} into {to_currency}, please.",
        "{amount} {from_currency} to {to_currency}?",
        "Can you tell me what {amount} {from_currency} comes to in {to_currency}?",
        "If I change {amount} {from_currency} to {to_currency}, what do I get?",
        "Please convert {amount} {from_currency} into {to_currency}.",
        "What would {amount} {from_currency} be in {to_currency}?",
        "Price check: {amount} {from_currency} in {to_currency}.",
        "Turn {amount} {from_currency} into {to_currency} at today's rate.",
    ),
    draw=draw_currency,
    result=currency_result,
    answer=currency_answer,
)

# --- flights ---------------------------------------------------------------------------------

AIRPORTS = [
    "JFK", "LHR", "CDG", "FRA", "AMS", "MAD", "BCN", "FCO", "DXB", "SIN", "HND", "ICN",
    "SYD", "LAX", "SFO", "ORD", "YYZ", "MEX", "GRU", "JNB", "IST", "ZRH", "CPH", "BOS",
]  # fmt: skip
CABINS = {
    "economy": "economy",
    "premium_economy": "premium economy",
    "business": "business class",
    "first": "first class",
}
AIRLINES = ["AF", "BA", "DL", "EK", "KL", "LH", "NH", "QF", "SQ", "TK", "UA"]


def draw_flight(rng: random.Random, split: str) -> dict[str, Slot]:
    origin, destination = rng.sample(share(AIRPORTS, split), 2)
    passengers = rng.randint(1, 6)
    cabin = rng.choice(list(CABINS))
    return {
        "origin": same(origin),
        "destination": same(destination),
        "date": date_slot(rng, split),
        "passengers": Slot(passengers, f"{passengers} passenger{'s' if passengers > 1 else ''}"),
        "cabin": Slot(cabin, CABINS[cabin]),
    }


def flight_result(rng: random.Random, args: dict[str, Any]) -> dict[str, Any]:
    departures = sorted(rng.sample(TIMES, 2))
    flights = [
        {
            "flight": f"{rng.choice(AIRLINES)}{rng.randint(10, 999)}",
            "departure": departure,
            "price_usd": rng.randrange(180, 2400, 10),
        }
        for departure in departures
    ]
    return {"origin": args["origin"], "destination": args["destination"], "flights": flights}


def flight_answer(args: dict[str, Any], result: dict[str, Any]) -> str:
    found = " and ".join(
        f"{f['flight']} at {f['departure']} for ${f['price_usd']}" for f in result["flights"]
    )
    return (
        f"I found {len(result['flights'])} flights from {args['origin']} to "
        f"{args['destination']} on {long_date(args['date'])}: {found}."
    )


FLIGHTS = Tool(
    name="search_flights",
    description="Search for flights between two airports on a date.",
    properties={
        "origin": string_param("IATA code of the departure airport", pattern="^[A-Z]{3}$"),
        "destination": string_param("IATA code of the arrival airport", pattern="^[A-Z]{3}$"),
        "date": DATE_PARAM,
        "passengers": integer_param("Number of passengers (default 1)", minimum=1, maximum=9),
        "cabin": enum_param("Cabin class (default economy)", list(CABINS)),
    },
    required=("origin", "destination", "date"),
    capability="search for flights",
    requests=(
        "Find flights from {origin} to {destination} on {date}.",
        "Are there any flights from {origin} to {destination} on {date} for {passengers}?",
        "Search {cabin} flights from {origin} to {destination} on {date}.",
        "I need to fly {origin} to {destination} on {date}.",
        "Look up flights {origin} to {destination}, {date}, {passengers}, {cabin}.",
        "What flights go from {origin} to {destination} on {date}?",
        "Show me {cabin} options from {origin} to {destination} on {date} for {passengers}.",
        "Flight search: {origin} to {destination} on {date}.",
        "Can you check flights leaving {origin} for {destination} on {date}?",
        "Any {cabin} seats from {origin} to {destination} on {date}?",
        "Find me a flight on {date} from {origin} to {destination} for {passengers}.",
        "What's available from {origin} to {destination} on {date} in {cabin}?",
    ),
    draw=draw_flight,
    result=flight_result,
    answer=flight_answer,
)

# --- timer -----------------------------------------------------------------------------------

TIMER_LENGTHS = [
    (30, "30 seconds"), (45, "45 seconds"), (60, "1 minute"), (90, "90 seconds"),
    (120, "2 minutes"), (180, "3 minutes"), (240, "4 minutes"), (300, "5 minutes"),
    (420, "7 minutes"), (480, "8 minutes"), (600, "10 minutes"), (720, "12 minutes"),
    (900, "15 minutes"), (1200, "20 minutes"), (1500, "25 minutes"), (1800, "30 minutes"),
    (2700, "45 minutes"), (3600, "1 hour"), (5400, "an hour and a half"), (7200, "2 hours"),
]  # fmt: skip
TIMER_LABELS = [
    "pasta", "laundry", "tea", "eggs", "oven", "workout",
    "meditation", "parking meter", "bread dough", "nap", "rice", "study break",
]  # fmt: skip


def draw_timer(rng: random.Random, split: str) -> dict[str, Slot]:
    seconds, spoken = rng.choice(share(TIMER_LENGTHS, split))
    return {
        "duration_seconds": Slot(seconds, spoken),
        "label": same(rng.choice(share(TIMER_LABELS, split))),
    }


def timer_result(rng: random.Random, args: dict[str, Any]) -> dict[str, Any]:
    return {"timer_id": f"tmr_{rng.randrange(10**4, 10**5)}", "status": "running"}


def timer_answer(args: dict[str, Any], result: dict[str, Any]) -> str:
    label = f"{args['label']} " if "label" in args else ""
    return f"Your {label}timer is set for {spoken_seconds(args['duration_seconds'])}."


TIMER = Tool(
    name="set_timer",
    description="Start a countdown timer.",
    properties={
        "duration_seconds": integer_param("Length in seconds", minimum=1, maximum=86400),
        "label": string_param("Name shown with the timer"),
    },
    required=("duration_seconds",),
    capability="set timers",
    requests=(
        "Set a timer for {duration_seconds}.",
        "Start a timer for {duration_seconds} and call it {label}.",
        "Timer for {duration_seconds}, please.",
        "Can you time {duration_seconds} for my {label}?",
        "Put a {label} timer on for {duration_seconds}.",
        "Count down {duration_seconds}.",
        "I need a timer: {duration_seconds}, labeled {label}.",
        "Set a countdown of {duration_seconds}.",
        "Alert me in {duration_seconds}.",
        "Set a {label} timer for {duration_seconds}.",
        "Start timing {duration_seconds} for the {label}.",
        "Please set a timer for {duration_seconds} named {label}.",
    ),
    draw=draw_timer,
    result=timer_result,
    answer=timer_answer,
)

# --- translation -----------------------------------------------------------------------------

LANGUAGES = {
    "en": "English", "es": "Spanish", "fr": "French", "de": "German", "it": "Italian",
    "pt": "Portuguese",
}  # fmt: skip
TARGETS = ("es", "fr", "de", "it", "pt")  # the order of each phrase's translations
TRANSLATIONS = {
    "Where is the train station?": (
        "¿Dónde está la estación de tren?", "Où est la gare ?", "Wo ist der Bahnhof?",
        "Dov'è la stazione dei treni?", "Onde fica a estação de trem?",
    ),
    "Thank you for your help.": (
        "Gracias por tu ayuda.", "Merci pour votre aide.", "Danke für Ihre Hilfe.",
        "Grazie per il tuo aiuto.", "Obrigado pela sua ajuda.",
    ),
    "How much does this cost?": (
        "¿Cuánto cuesta esto?", "Combien ça coûte ?", "Wie viel kostet das?",
        "Quanto costa questo?", "Quanto custa isto?",
    ),
    "I would like a coffee, please.": (
        "Quisiera un café, por favor.", "Je voudrais un café, s'il vous plaît.",
        "Ich hätte gern einen Kaffee, bitte.", "Vorrei un caffè, per favore.",
        "Eu gostaria de um café, por favor.",
    ),
    "Good morning, how are you?": (
        "Buenos días, ¿cómo estás?", "Bonjour, comment allez-vous ?",
        "Guten Morgen, wie geht es dir?", "Buongiorno, come stai?", "Bom dia, como vai?",
    ),
    "The meeting starts at noon.": (
        "La reunión empieza al mediodía.", "La réunion commence à midi.",
        "Die Besprechung beginnt am Mittag.", "La riunione inizia a mezzogiorno.",
        "A reunião começa ao meio-dia.",
    ),
    "Can you help me?": (
        "¿Puedes ayudarme?", "Pouvez-vous m'aider ?", "Können Sie mir helfen?",
        "Puoi aiutarmi?", "Você pode me ajudar?",
    ),
    "I am allergic to peanuts.": (
        "Soy alérgico a los cacahuetes.", "Je suis allergique aux arachides.",
        "Ich bin allergisch gegen Erdnüsse.", "Sono allergico alle arachidi.",
        "Sou alérgico a amendoim.",
    ),
    "The bill, please.": (
        "La cuenta, por favor.", "L'addition, s'il vous plaît.", "Die Rechnung, bitte.",
        "Il conto, per favore.", "A conta, por favor.",
    ),
    "Where can I buy a ticket?": (
        "¿Dónde puedo comprar un billete?", "Où puis-je acheter un billet ?",
        "Wo kann ich eine Fahrkarte kaufen?", "Dove posso comprare un biglietto?",
        "Onde posso comprar um bilhete?",
    ),
    "It is raining today.": (
        "Hoy está lloviendo.", "Il pleut aujourd'hui.", "Heute regnet es.", "Oggi piove.",
        "Está chovendo hoje.",
    ),
    "See you tomorrow.": ("Hasta mañana.", "À demain.", "Bis morgen.", "A domani.", "Até amanhã."),
}  # fmt: skip


def draw_translation(rng: random.Random, split: str) -> dict[str, Slot]:
    target = rng.choice(TARGETS)
    return {
        "text": same(rng.choice(share(list(TRANSLATIONS), split))),
        "target_language": Slot(target, LANGUAGES[target]),
        "source_language": Slot("en", LANGUAGES["en"]),
    }


def translation_result(rng: random.Random, args: dict[str, Any]) -> dict[str, Any]:
    target = args["target_language"]
    return {"translation": TRANSLATIONS[args["text"]][TARGETS.index(target)], "language": target}


def translation_answer(args: dict[str, Any], result: dict[str, Any]) -> str:
    language = LANGUAGES[args["target_language"]]
    return f'In {language}, "{args["text"]}" is "{result["translation"]}"'


TRANSLATE = Tool(
    name="translate_text",
    description="Translate text into another language.",
    properties={
        "text": string_param("The text to translate"),
        "target_language": enum_param("ISO 639-1 code of the language wanted", list(LANGUAGES)),
        "source_language": enum_param(
            "ISO 639-1 code of the text's language (detected if absent)", list(LANGUAGES)
        ),
    },
    required=("text", "target_language"),
    capability="translate text",
    requests=(
        'Translate "{text}" into {target_language}.',
        'How do you say "{text}" in {target_language}?',
        'Translate this from {source_language} to {target_language}: "{text}"',
        'What is "{text}" in {target_language}?',
        'Can you put "{text}" into {target_language} for me?',
        '{target_language} translation of "{text}", please.',
        'I need "{text}" in {target_language}.',
        'Please translate "{text}" from {source_language} into {target_language}.',
        'Say "{text}" in {target_language}.',
        'Help me write "{text}" in {target_language}.',
        'Render "{text}" in {target_language}.',
        'My {source_language} sentence is "{text}" Translate it to {target_language}.',
    ),
    draw=draw_translation,
    result=translation_result,
    answer=translation_answer,
)

# --- stock price -----------------------------------------------------------------------------

STOCKS = [
    ("AAPL", "NASDAQ"), ("MSFT", "NASDAQ"), ("NVDA", "NASDAQ"), ("AMZN", "NASDAQ"),
    ("GOOGL", "NASDAQ"), ("META", "NASDAQ"), ("TSLA", "NASDAQ"), ("NFLX", "NASDAQ"),
    ("IBM", "NYSE"), ("KO", "NYSE"), ("JPM", "NYSE"), ("DIS", "NYSE"),
    ("NKE", "NYSE"), ("WMT", "NYSE"), ("XOM", "NYSE"), ("V", "NYSE"),
    ("SAP", "XETRA"), ("SIE", "XETRA"), ("BMW", "XETRA"), ("ADS", "XETRA"),
    ("HSBA", "LSE"), ("BP", "LSE"), ("VOD", "LSE"), ("AZN", "LSE"),
]  # fmt: skip
EXCHANGE_CURRENCY = {"NASDAQ": "USD", "NYSE": "USD", "XETRA": "EUR", "LSE": "GBP"}


def draw_stock(rng: random.Random, split: str) -> dict[str, Slot]:
    symbol, exchange = rng.choice(share(STOCKS, split))
    return {"symbol": same(symbol), "exchange": same(exchange)}


def stock_result(rng: random.Random, args: dict[str, Any]) -> dict[str, Any]:
    exchange = dict(STOCKS)[args["symbol"]]
    return {
        "symbol": args["symbol"],
        "price": round(rng.uniform(20, 900), 2),
        "currency": EXCHANGE_CURRENCY[exchange],
        "change_percent": round(rng.uniform(-4, 4), 2),
    }


def stock_answer(args: dict[str, Any], result: dict[str, Any]) -> str:
    change = result["change_percent"]
    return (
        f"{result['symbol']} is at {result['price']:.2f} {result['currency']}, "
        f"{'up' if change >= 0 else 'down'} {abs(change):.2f}% today."
    )


STOCK = Tool(
    name="get_stock_price",
    description="Get the latest trading price of a stock.",
    properties={
        "symbol": string_param("Ticker symbol, e.g. AAPL", pattern="^[A-Z]{1,5}$"),
        "exchange": enum_param("Stock exchange", list(EXCHANGE_CURRENCY)),
    },
    required=("symbol",),
    capability="look up stock prices",
    requests=(
        "What's the stock price of {symbol}?",
        "How is {symbol} trading right now?",
        "Get me the latest quote for {symbol} on {exchange}.",
        "Check the share price of {symbol} for me.",
        "What is {symbol} at today?",
        "Price of {symbol} on the {exchange}?",
        "Look up the current share price of {symbol}.",
        "Where is {symbol} trading on {exchange} right now?",
        "Give me a quote on {symbol}.",
        "How much is one share of {symbol}?",
        "Stock quote for {symbol} ({exchange}), please.",
        "Has {symbol} gone up today?",
    ),
    draw=draw_stock,
    result=stock_result,
    answer=stock_answer,
)

# --- email -----------------------------------------------------------------------------------

CONTACTS = [
    "maria.lopez@example.com", "sam.chen@example.org", "priya.nair@example.com",
    "tom.becker@example.net", "alex.morgan@example.com", "yuki.tanaka@example.org",
    "olivia.smith@example.com", "david.okafor@example.net", "lena.fischer@example.com",
    "marco.rossi@example.org", "nina.petrova@example.com", "jake.wilson@example.net",
    "hr@example.com", "support@example.org", "team-leads@example.com", "billing@example.net",
]  # fmt: skip
MESSAGES = [
    ("Running late", "I'm running about 15 minutes late, please start without me."),
    ("Meeting notes", "The notes from today's meeting are in the shared folder."),
    ("Lunch on Friday?", "Are you free for lunch on Friday?"),
    ("Invoice 2231", "Could you confirm that invoice 2231 has been paid?"),
    ("Vacation request", "I'd like to take the first week of August off."),
    ("Welcome aboard", "Welcome to the team, we're glad to have you."),
    ("Slides for Monday", "Please send me your slides by Sunday evening."),
    ("Thank you", "Thanks again for your help with the move."),
    ("Password reset", "I can't log in to my account, can you reset my password?"),
    ("Party on Saturday", "We're having a small party on Saturday at 7, hope you can come."),
    ("Contract draft", "The contract draft is ready for your review."),
    ("Order 5570", "My order 5570 arrived damaged, I'd like a replacement."),
    ("Quick question", "Do you have time for a short call tomorrow morning?"),
    ("Book recommendation", "You should read The Remains of the Day, I loved it."),
    ("Rent receipt", "Could you send me the receipt for this month's rent?"),
    ("Project update", "The prototype passed all tests, we're on track for release."),
]


def draw_email(rng: random.Random, split: str) -> dict[str, Slot]:
    to, cc = rng.sample(share(CONTACTS, split), 2)
    subject, body = rng.choice(share(MESSAGES, split))
    return {"to": same(to), "subject": same(subject), "body": same(body), "cc": same(cc)}


def email_result(rng: random.Random, args: dict[str, Any]) -> dict[str, Any]:
    return {"status": "sent", "message_id": f"msg_{rng.getrandbits(32):08x}"}


def email_answer(args: dict[str, Any], result: dict[str, Any]) -> str:
    copied = f", with {args['cc']} in copy" if "cc" in args else ""
    return f'Your email "{args["subject"]}" has been sent to {args["to"]}{copied}.'


EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+\.[a-z]+$"
EMAIL = Tool(
    name="send_email",
    description="Send an email from the user's account.",
    properties={
        "to": string_param("Recipient's email address", pattern=EMAIL_PATTERN),
        "subject": string_param("Subject line"),
        "body": string_param("Text of the message"),
        "cc": string_param("Address to copy", pattern=EMAIL_PATTERN),
    },
    required=("to", "subject", "body"),
    capability="send emails",
    requests=(
        'Send an email to {to} with the subject "{subject}" saying "{body}"',
        'Email {to}: subject "{subject}", message "{body}"',
        'Write to {to} and cc {cc}. Subject: "{subject}". Body: "{body}"',
        'Please email {to} with subject "{subject}" and the text "{body}"',
        'Can you send {to} a message titled "{subject}" that says "{body}"',
        'Drop {to} an email, subject "{subject}": "{body}"',
        'Send "{body}" to {to} with the subject line "{subject}", and copy {cc}.',
        'Compose an email to {to}. Subject "{subject}". Say: "{body}"',
        'Mail {to} the following, subject "{subject}": "{body}"',
        'Let {to} know "{body}" by email, subject "{subject}".',
        'Email {to} (cc {cc}) with the title "{subject}": "{body}"',
        'Send an email with the subject "{subject}" to {to}, body "{body}"',
    ),
    draw=draw_email,
    result=email_result,
    answer=email_answer,
)

# --- reminders -------------------------------------------------------------------------------

REMINDER_TASKS = [
    "call the plumber", "renew my passport", "water the plants", "pay the electricity bill",
    "pick up the dry cleaning", "book a dentist appointment", "send Mom a birthday card",
    "take out the recycling", "submit the expense report", "buy milk", "back up my laptop",
    "return the library books", "check the tire pressure", "cancel the gym trial",
    "order printer ink", "feed the neighbor's cat",
]  # fmt: skip


def draw_reminder(rng: random.Random, split: str) -> dict[str, Slot]:
    return {
        "text": same(rng.choice(share(REMINDER_TASKS, split))),
        "date": date_slot(rng, split),
        "time": time_slot(rng, split),
        "priority": same(rng.choice(["low", "normal", "high"])),
    }


def reminder_result(rng: random.Random, args: dict[str, Any]) -> dict[str, Any]:
    return {"reminder_id": f"rem_{rng.randrange(10**5, 10**6)}", "status": "scheduled"}


def reminder_answer(args: dict[str, Any], result: dict[str, Any]) -> str:
    when = long_date(args["date"]) + (f" at {args['time']}" if "time" in args else "")
    return f"Okay, I'll remind you to {args['text']} on {when}."


REMINDER = Tool(
    name="create_reminder",
    description="Set a reminder that notifies the user at a date and time.",
    properties={
        "text": string_param("What to remind the user of"),
        "date": DATE_PARAM,
        "time": {**TIME_PARAM, "description": "24-hour time as HH:MM (default 09:00)"},
        "priority": enum_param("Priority (default normal)", ["low", "normal", "high"]),
    },
    required=("text", "date"),
    capability="set reminders",
    requests=(
        "Remind me to {text} on {date} at {time}.",
        "Set a reminder to {text} on {date}.",
        "Create a {priority} priority reminder to {text} on {date}.",
        "Don't let me forget to {text} on {date} at {time}.",
        "Add a reminder: {text}, {date}.",
        "On {date} at {time}, remind me to {text}.",
        "I need a {priority} priority reminder on {date} to {text}.",
        "Please remind me on {date} to {text}.",
        "Reminder for {date} at {time}: {text}.",
        "Can you remind me to {text} on {date}? Mark it {priority} priority.",
        "Make sure I remember to {text} on {date} at {time}.",
        "Set a {priority}-priority reminder for {date}: {text}.",
    ),
    draw=draw_reminder,
    result=reminder_result,
    answer=reminder_answer,
)

# --- restaurants -----------------------------------------------------------------------------

DINING_CITIES = [
    "Chicago", "Austin", "Berlin", "Barcelona", "Rome", "Osaka", "Boston", "Seattle",
    "Lyon", "Porto", "Amsterdam", "Copenhagen", "Mexico City", "Bangkok", "San Diego", "Vienna",
]  # fmt: skip
CUISINES = ["italian", "japanese", "mexican", "indian", "thai", "french", "chinese", "korean"]
NAME_STARTS = ["The Golden", "Little", "Blue", "Old", "The Hungry", "Green", "Casa", "Red"]
NAME_ENDS = ["Fork", "Lantern", "Garden", "Table", "Kitchen", "Spoon", "Harbor", "Olive"]


def draw_restaurant(rng: random.Random, split: str) -> dict[str, Slot]:
    cuisine = rng.choice(CUISINES)
    return {
        "location": same(rng.choice(share(DINING_CITIES, split))),
        "cuisine": Slot(cuisine, cuisine.title()),
        "max_price": same(rng.randint(1, 4)),
        "open_now": Slot(True, "open now"),
    }


def restaurant_result(rng: random.Random, args: dict[str, Any]) -> dict[str, Any]:
    names = {f"{rng.choice(NAME_STARTS)} {rng.choice(NAME_ENDS)}" for _ in range(3)}
    found = [{"name": n, "rating": round(rng.uniform(3.8, 4.9), 1)} for n in sorted(names)]
    return {"restaurants": sorted(found, key=lambda r: -r["rating"])}


def restaurant_answer(args: dict[str, Any], result: dict[str, Any]) -> str:
    places = [f"{r['name']} ({r['rating']})" for r in result["restaurants"]]
    listed = places[0] if len(places) == 1 else ", ".join(places[:-1]) + f" and {places[-1]}"
    return f"Here are some options in {args['location']}: {listed}."


RESTAURANTS = Tool(
    name="search_restaurants",
    description="Find restaurants in a city.",
    properties={
        "location": string_param("City or neighborhood"),
        "cuisine": enum_param("Type of food", CUISINES),
        "max_price": integer_param("Highest price level, 1 (cheap) to 4", minimum=1, maximum=4),
        "open_now": {"type": "boolean", "description": "Only places open now"},
    },
    required=("location",),
    capability="find restaurants",
    requests=(
        "Find {cuisine} restaurants in {location}.",
        "Where can I get something to eat in {location}?",
        "Any good {cuisine} places in {location} that are {open_now}?",
        "Recommend restaurants in {location} at price level {max_price} or lower.",
        "I'm craving {cuisine} food in {location}. What's nearby?",
        "Search for restaurants in {location} that are {open_now}.",
        "Show me {cuisine} spots in {location} with a price level of at most {max_price}.",
        "What restaurants are there in {location}?",
        "Looking for a {cuisine} restaurant in {location}.",
        "Find somewhere to eat in {location} that's {open_now}.",
        "Good {cuisine} restaurants around {location}?",
        "List {cuisine} restaurants in {location}, price level {max_price} at most.",
    ),
    draw=draw_restaurant,
    result=restaurant_result,
    answer=restaurant_answer,
)

# --- news ------------------------------------------------------------------------------------

HEADLINES = {
    "business": [
        "Retail sales rise for a third month",
        "Shipping costs ease as port delays clear",
        "Small firms report stronger hiring",
        "Central bank holds interest rates steady",
    ],
    "technology": [
        "New battery design promises faster charging",
        "Chipmakers expand factory capacity",
        "Open-source project reaches one million users",
        "Phone makers agree on a common charger",
    ],
    "sports": [
        "Underdogs reach the cup final",
        "Marathon record falls by eight seconds",
        "Veteran goalkeeper announces retirement",
        "Team signs promising young striker",
    ],
    "science": [
        "Telescope spots water vapor on a distant planet",
        "New species of frog found in the Andes",
        "Researchers map the fruit fly brain",
        "Ice cores reveal ancient climate shifts",
    ],
    "health": [
        "Study links daily walks to better sleep",
        "New vaccine enters final trials",
        "Hospitals cut waiting times",
        "Researchers test a longer-lasting flu shot",
    ],
    "entertainment": [
        "Animated film tops the box office",
        "Band announces world tour",
        "Streaming series renewed for a second season",
        "Museum opens a film costume exhibit",
    ],
    "politics": [
        "Parliament passes the budget bill",
        "Leaders meet for climate talks",
        "City council approves new bike lanes",
        "Election turnout reaches a record high",
    ],
}
COUNTRIES = [
    ("United States", "US"), ("Germany", "DE"), ("Japan", "JP"), ("Brazil", "BR"),
    ("India", "IN"), ("France", "FR"), ("Canada", "CA"), ("Australia", "AU"),
    ("Kenya", "KE"), ("Mexico", "MX"), ("Italy", "IT"), ("South Korea", "KR"),
    ("Spain", "ES"), ("Nigeria", "NG"), ("Sweden", "SE"), ("Argentina", "AR"),
]  # fmt: skip
HEADLINE_COUNTS = [2, 3, 4, 5, 6, 7, 8, 10]


def draw_news(rng: random.Random, split: str) -> dict[str, Slot]:
    country, code = rng.choice(share(COUNTRIES, split))
    return {
        "topic": same(rng.choice(list(HEADLINES))),
        "country": Slot(code, country),
        "limit": same(rng.choice(share(HEADLINE_COUNTS, split))),
    }


def news_result(rng: random.Random, args: dict[str, Any]) -> dict[str, Any]:
    # The fake feed has four stories a topic; it returns fewer when that is all it has.
    count = min(args.get("limit", 3), len(HEADLINES[args["topic"]]))
    return {"headlines": rng.sample(HEADLINES[args["topic"]], count)}


def news_answer(args: dict[str, Any], result: dict[str, Any]) -> str:
    listed = " ".join(f"{i}. {h}." for i, h in enumerate(result["headlines"], 1))
    return f"Top {args['topic']} headlines: {listed}"


NEWS = Tool(
    name="get_news_headlines",
    description="Get the latest news headlines on a topic.",
    properties={
        "topic": enum_param("News topic", list(HEADLINES)),
        "country": string_param("ISO 3166 two-letter country code", pattern="^[A-Z]{2}$"),
        "limit": integer_param("How many headlines (default 3)", minimum=1, maximum=10),
    },
    required=("topic",),
    capability="fetch news headlines",
    requests=(
        "What's the latest {topic} news?",
        "Give me the top {limit} {topic} headlines.",
        "Any {topic} news from {country} today?",
        "Show me {topic} headlines for {country}.",
        "What's happening in {topic} today?",
        "I want {limit} {topic} stories from {country}.",
        "Catch me up on {topic} news.",
        "Top {topic} headlines in {country}, please.",
        "List {limit} headlines about {topic}.",
        "What are today's {topic} headlines?",
        "Brief me on {topic} news in {country}.",
        "Fetch the {limit} biggest {topic} stories right now.",
    ),
    draw=draw_news,
    result=news_result,
    answer=news_answer,
)

TOOLS = [
    WEATHER, CONVERT_UNITS, CALENDAR, CURRENCY, FLIGHTS, TIMER,
    TRANSLATE, STOCK, EMAIL, REMINDER, RESTAURANTS, NEWS,
]  # fmt: skip

# --- conversations ---------------------------------------------------------------------------

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant with access to tools. Use them when they help.",
    "You are a friendly personal assistant.",
    "You help users get things done. Keep answers short.",
    "You are an assistant in a phone app. Be brief.",
    "Answer accurately. Call a tool only when it is needed.",
    "You are a travel and productivity assistant.",
    "Be polite and to the point.",
]
# Two requests in one message, answered by two parallel calls.
JOINS = ["{0} {1}", "{0} Also: {1}", "Two things. First: {0} Second: {1}", "{0}\n{1}"]
# Questions no tool is for, with their answers.
GENERAL = [
    ("What's the capital of Australia?", "The capital of Australia is Canberra."),
    ("Who wrote Pride and Prejudice?", "Jane Austen wrote Pride and Prejudice, published in 1813."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is 17 times 6?", "17 times 6 is 102."),
    ("Give me a synonym for 'happy'.", "A synonym for 'happy' is 'cheerful'."),
    (
        "Why is the sky blue?",
        "Air molecules scatter short blue wavelengths of sunlight much more than red ones, "
        "so blue light reaches your eyes from every direction of the sky.",
    ),
    ("Tell me a fun fact about octopuses.", "Octopuses have three hearts and blue blood."),
    ("What does CPU stand for?", "CPU stands for central processing unit."),
    (
        "What's the difference between weather and climate?",
        "Weather is the state of the atmosphere over hours or days; climate is its average "
        "pattern over decades.",
    ),
    (
        "Write a haiku about the sea.",
        "Grey waves fold and break,\nsalt wind carries gull voices,\nthe tide keeps its time.",
    ),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("How many continents are there?", "There are seven continents."),
    ("At what temperature does water boil at sea level?", "At sea level water boils at 100 °C."),
    ("Thanks, that's all for now!", "You're welcome! Have a great day."),
    (
        "How can I stay focused while studying?",
        "Work in short blocks of about 25 minutes with 5-minute breaks, and keep your phone "
        "out of reach.",
    ),
    (
        "Explain what a prime number is.",
        "A prime number is a whole number greater than 1 whose only divisors are 1 and itself, "
        "like 2, 3, 5 and 7.",
    ),
    ("In what year did people first walk on the Moon?", "People first walked on the Moon in 1969."),
    ("Recommend a classic science fiction novel.", "Try Dune by Frank Herbert."),
    ("How do I boil an egg?", "Boil it for about 7 minutes, then cool it in cold water."),
    ("What's the largest planet in the solar system?", "Jupiter is the largest planet."),
]
ID_CHARS = string.ascii_letters + string.digits


def call_id(rng: random.Random) -> str:
    return "".join(rng.choices(ID_CHARS, k=9))


def offered_tools(
    rng: random.Random, needed: list[Tool], excluded: Tool | None = None
) -> list[Tool]:
    """The needed tools and distractors, 2 to 6 in all, in a random order."""
    others = [t for t in TOOLS if t not in needed and t is not excluded]
    count = max(rng.choice(TOOL_COUNTS), len(needed))
    tools = list(needed) + rng.sample(others, count - len(needed))
    rng.shuffle(tools)
    return tools


def opening(rng: random.Random, split: str, user: str) -> list[dict[str, Any]]:
    messages = []
    if rng.random() < SYSTEM_SHARE:
        messages.append({"role": "system", "content": rng.choice(share(SYSTEM_PROMPTS, split))})
    return [*messages, {"role": "user", "content": user}]


def calling(rng: random.Random, split: str, tools: list[Tool]) -> dict[str, Any]:
    """A request answered by one call to each of `tools` (two calls: two requests joined)."""
    requests = [tool.request(rng, split) for tool in tools]
    while len({text for text, _ in requests}) < len(requests):  # the same tool asked twice
        requests = [tool.request(rng, split) for tool in tools]
    texts = [text for text, _ in requests]
    user = rng.choice(JOINS).format(*texts) if len(texts) > 1 else texts[0]
    calls, results, answers = [], [], []
    for tool, (_, args) in zip(tools, requests, strict=True):
        result = tool.result(rng, args)
        function = {"name": tool.name, "arguments": json.dumps(args, ensure_ascii=False)}
        calls.append({"id": call_id(rng), "type": "function", "function": function})
        results.append(
            {
                "role": "tool",
                "tool_call_id": calls[-1]["id"],
                "name": tool.name,
                "content": json.dumps(result, ensure_ascii=False),
            }
        )
        answers.append(tool.answer(args, result))
    messages = [
        *opening(rng, split, user),
        {"role": "assistant", "content": None, "tool_calls": calls},
        *results,
        {"role": "assistant", "content": " ".join(answers)},
    ]
    needed = list(dict.fromkeys(tools))
    return {"tools": [t.schema for t in offered_tools(rng, needed)], "messages": messages}


def two_tools(rng: random.Random) -> list[Tool]:
    """Half the time the same tool twice (two cities, two conversions), else two tools."""
    first = rng.choice(TOOLS)
    if rng.random() < 0.5:
        return [first, first]
    return [first, rng.choice([t for t in TOOLS if t is not first])]


def missing_tool(rng: random.Random, split: str, wanted: Tool) -> dict[str, Any]:
    """A request for a tool that is not offered: the assistant says what it can do instead."""
    tools = offered_tools(rng, [], excluded=wanted)
    can = [t.capability for t in tools[:2]]
    answer = (
        f"Sorry, I can't {wanted.capability} with the tools I have here. "
        f"I can {can[0]} or {can[1]} if that helps."
    )
    text, _ = wanted.request(rng, split)
    messages = [*opening(rng, split, text), {"role": "assistant", "content": answer}]
    return {"tools": [t.schema for t in tools], "messages": messages}


def general(rng: random.Random, split: str, question: tuple[str, str]) -> dict[str, Any]:
    tools = offered_tools(rng, [])
    messages = [*opening(rng, split, question[0]), {"role": "assistant", "content": question[1]}]
    return {"tools": [t.schema for t in tools], "messages": messages}


def user_message(conversation: dict[str, Any]) -> str:
    return next(m["content"] for m in conversation["messages"] if m["role"] == "user")


def build_split(rng: random.Random, split: str) -> list[dict[str, Any]]:
    counts = COUNTS[split]
    makers: list[Callable[[], dict[str, Any]]] = []
    makers += [
        partial(calling, rng, split, [TOOLS[i % len(TOOLS)]]) for i in range(counts["single"])
    ]
    makers += [partial(calling, rng, split, two_tools(rng)) for _ in range(counts["parallel"])]
    makers += [
        partial(missing_tool, rng, split, rng.choice(TOOLS)) for _ in range(counts["missing_tool"])
    ]
    questions = rng.sample(share(GENERAL, split), counts["general"])
    makers += [partial(general, rng, split, question) for question in questions]
    rng.shuffle(makers)
    conversations: list[dict[str, Any]] = []
    seen: set[str] = set()
    for make in makers:
        for _ in range(100):  # draw again until the user message is new to this split
            conversation = make()
            if user_message(conversation) not in seen:
                break
        else:
            raise RuntimeError(f"{split}: no new user message after 100 draws")
        seen.add(user_message(conversation))
        conversations.append(conversation)
    return conversations


def build() -> dict[str, str]:
    """The text of each split's file."""
    rng = random.Random(SEED)
    splits = {split: build_split(rng, split) for split in FILES}
    shared = {user_message(c) for c in splits["train"]} & {
        user_message(c) for c in splits["heldout"]
    }
    if shared:
        raise RuntimeError(f"user messages in both splits: {sorted(shared)[:3]}")
    return {
        split: "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations)
        for split, conversations in splits.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the files differ")
    args = parser.parse_args()
    texts = build()
    for split, text in texts.items():
        path = FILES[split]
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                sys.exit(f"{path} differs from what this script builds")
            print(f"{path}: up to date")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")
        print(f"wrote {path}: {text.count(chr(10))} conversations, {len(text.encode())} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
