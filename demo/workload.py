"""The reference workload: three task families whose answers a scripted teacher computes by rules.

A STAND-IN for a real teacher model: each family's answer is a deterministic function of the
request, so the demo and tests are reproducible offline. Inputs come from seeded generators.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from demo.teacher import last_user_text

Scorer = Literal["exact", "json_fields"]


@dataclass(frozen=True)
class TaskFamily:
    """One prompt family: how clients ask (system prompt, input generator) and how the teacher answers."""

    name: str
    """The task name (``metadata.task`` when ``tagged``)."""
    system_prompt: str
    scorer: Scorer
    """The promotion scorer that fits the answers: ``exact`` for labels, ``json_fields`` for JSON."""
    generate: Callable[[random.Random], str]
    """A user input drawn from ``rng``."""
    answer_text: Callable[[str], str]
    """The teacher's answer (message content) to a user input."""
    json_mode: bool
    """Clients ask for ``response_format={"type": "json_object"}``."""
    max_tokens: int
    """What clients send as ``max_tokens``: room for the longest answer with a margin."""
    tagged: bool
    """Clients tag requests with ``metadata.task``; untagged ones are grouped by system-prompt fingerprint."""

    @property
    def task_key(self) -> str:
        """The key the gateway files this family's records under (``gateway.protocol.task_key``)."""
        if self.tagged:
            return self.name
        canonical = " ".join(self.system_prompt.split())
        return "sys-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def request(self, rng: random.Random, model: str = "teacher-large") -> dict[str, Any]:
        """A chat completions body as this family's client application sends it."""
        return self.request_for(self.generate(rng), model)

    def request_for(self, user_input: str, model: str = "teacher-large") -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "messages": [
                {"role": "system", "content": self.system_prompt},
                {"role": "user", "content": user_input},
            ],
            # Applications that want one answer per input decode greedily; the student then does too.
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        if self.tagged:
            body["metadata"] = {"task": self.name}
        return body

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """The teacher's assistant message for a request of this family."""
        return {"role": "assistant", "content": self.answer_text(last_user_text(body))}

    def inputs(self, seed: int, n: int) -> list[str]:
        """``n`` distinct user inputs drawn with ``seed`` (the first occurrence of each is kept)."""
        rng = random.Random(f"{self.name}:{seed}")
        seen: dict[str, None] = {}
        for _ in range(n * 50):
            if len(seen) == n:
                break
            seen.setdefault(self.generate(rng), None)
        return list(seen)


def _pick(rng: random.Random, items: Sequence[str]) -> str:
    return items[rng.randrange(len(items))]


def _alternation(items: Sequence[str]) -> str:
    """A regex alternation of literal phrases, longest first so that no phrase shadows a longer one."""
    return "|".join(re.escape(item) for item in sorted(items, key=len, reverse=True))


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


FIRST_NAMES = (
    "Ana",
    "Ben",
    "Chloe",
    "Daniel",
    "Elena",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jonas",
    "Kemal",
    "Lena",
    "Marco",
    "Nadia",
    "Omar",
    "Priya",
    "Quentin",
    "Rosa",
    "Sven",
    "Tara",
    "Umar",
    "Vera",
    "Wei",
    "Yusuf",
    "Zoe",
    "Aisha",
    "Bruno",
    "Carmen",
    "Dmitri",
    "Emma",
    "Felix",
    "Greta",
    "Hugo",
    "Ivy",
    "Jamal",
    "Kira",
)
LAST_NAMES = (
    "Lopez",
    "Smith",
    "Novak",
    "Tanaka",
    "Okafor",
    "Schmidt",
    "Rossi",
    "Kowalski",
    "Haddad",
    "Silva",
    "Dubois",
    "Jensen",
    "Patel",
    "Nguyen",
    "Moreau",
    "Fischer",
    "Costa",
    "Ivanova",
    "Berg",
    "Khan",
    "Meyer",
    "Larsen",
    "Garcia",
    "Chen",
    "Weber",
    "Alvarez",
    "Sato",
    "Murphy",
    "Bauer",
    "Ortiz",
)
CITIES = (
    "Berlin",
    "Lisbon",
    "Austin",
    "Osaka",
    "Lagos",
    "Toronto",
    "Lyon",
    "Krakow",
    "Denver",
    "Porto",
    "Madrid",
    "Oslo",
    "Dublin",
    "Seattle",
    "Milan",
    "Vienna",
    "Boston",
    "Prague",
    "Sydney",
    "Nairobi",
)
PRODUCTS = (
    "espresso machine",
    "standing desk",
    "wireless headphones",
    "yoga mat",
    "desk lamp",
    "rice cooker",
    "hiking backpack",
    "smart watch",
    "office chair",
    "air purifier",
    "blender",
    "electric kettle",
    "monitor stand",
    "phone case",
    "winter jacket",
    "running shoes",
    "coffee grinder",
    "bluetooth speaker",
    "camping tent",
    "water bottle",
    "laptop sleeve",
    "mechanical keyboard",
    "robot vacuum",
    "table fan",
)
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)


# ---------------------------------------------------------------------------------------------------
# classify-email: a support inbox routes each email to one team.
# ---------------------------------------------------------------------------------------------------

EMAIL_LABELS = ("refund", "account", "billing", "technical", "shipping", "other")
"""The label set, in the teacher's priority order: an email that matches several teams' rules goes
to the first (money going back beats a charge question, which beats a delivery question)."""

EMAIL_SYSTEM_PROMPT = (
    "You route emails sent to an online shop's customer support. Answer with one label and nothing "
    "else: refund, account, billing, technical, shipping or other. If several fit, answer the first "
    "of them in this order."
)

# The teacher's rules: a label applies when any of its patterns occurs (case-insensitive).
EMAIL_RULES: dict[str, tuple[str, ...]] = {
    "refund": (r"\brefund", r"\bmoney back\b", r"\breimburse", r"\bchargeback\b"),
    "account": (
        r"\bpassword\b",
        r"\blog ?in\b",
        r"\bsign in\b",
        r"\blocked out\b",
        r"\busername\b",
        r"\btwo-factor\b",
        r"\bdelete my account\b",
        r"\bprofiles?\b",
    ),
    "billing": (
        r"\bcharged?\b",
        r"\binvoice",
        r"\bbilling\b",
        r"\bbilled\b",
        r"\bpay\b",
        r"\bpayment",
        r"\breceipt\b",
        r"\bvat\b",
        r"\bsubscription\b",
    ),
    "technical": (
        r"\berror\b",
        r"\bcrash",
        r"\bbug\b",
        r"\bfreezes\b",
        r"\bnot loading\b",
        r"\bblank screen\b",
        r"\bsync",
        r"\btimes out\b",
    ),
    "shipping": (
        r"\bdeliver",
        r"\bpackage\b",
        r"\bparcel\b",
        r"\btracking\b",
        r"\bshipped\b",
        r"\bcourier\b",
        r"\bin transit\b",
        r"\bshipping\b",
    ),
}
_EMAIL_PATTERNS = {label: re.compile("|".join(rules), re.IGNORECASE) for label, rules in EMAIL_RULES.items()}


def classify_email(email: str) -> str:
    """The teacher's label for an email: the first label (in priority order) whose rules match."""
    for label in EMAIL_LABELS[:-1]:
        if _EMAIL_PATTERNS[label].search(email):
            return label
    return "other"


# What customers write for each intent. Each sentence matches its own label's rules and no other's,
# which tests check; {slots} are filled from the vocabulary lists.
EMAIL_SENTENCES: dict[str, tuple[str, ...]] = {
    "refund": (
        "I returned the {product} on {date} and I am still waiting for my refund.",
        "Please refund the {amount} for order #{order}, the {product} arrived broken.",
        "Can I get my money back for the {product}? It is not what I expected.",
        "I would like a refund for order #{order}.",
        "The {product} stopped working after {n} days and I want a full refund.",
        "How long does it take to process a refund of {amount}?",
        "I cancelled within the trial period, so please reimburse the {amount}.",
        "The {product} was damaged, I sent it back last {weekday} and expect my money back.",
        "When will the refund for my returned {product} show up?",
        "I want to return the {product} and get a refund.",
    ),
    "account": (
        "I forgot my password and the reset email never comes.",
        "I cannot log in since {weekday}, it keeps saying my details are wrong.",
        "Please delete my account and all the data you hold about me.",
        "I am locked out after too many attempts, can you unlock me?",
        "How do I change the username on my profile?",
        "The two-factor code is sent to an old phone number of mine.",
        "I want to update the email address on my profile to {email}.",
        "Every time I try to sign in I am sent back to the start page.",
        "Someone changed my password without my permission.",
        "Can you merge my two profiles into one?",
    ),
    "billing": (
        "I was charged {amount} twice for order #{order}.",
        "Could you send me an invoice for order #{order}? I need it for my accounting.",
        "My card was declined but I still see a pending payment of {amount}.",
        "Why was I billed {amount} this month instead of the usual price?",
        "Please add our company VAT number to the invoice for order #{order}.",
        "I need a receipt for my purchase of the {product} on {date}.",
        "How do I change the card used for my subscription?",
        "There is a charge of {amount} on my statement that I do not recognise.",
        "Can I pay for order #{order} by bank transfer instead of card?",
        "My subscription renewed at {amount} although I had switched to the yearly plan.",
    ),
    "technical": (
        "The app shows an error {code} when I open my orders.",
        "Your website is not loading on my phone since the last update.",
        "The checkout page freezes right after I enter my address.",
        "The app crashes every time I open the {product} page.",
        "I think I found a bug: the wishlist is empty after I restart the app.",
        "My orders do not sync between the app and the website.",
        "I only get a blank screen when I open the store on {browser}.",
        "The search times out whenever I look for a {product}.",
        "Adding the {product} to the cart gives me error {code}.",
        "The app crashes on startup on my {device}.",
    ),
    "shipping": (
        "My package for order #{order} has not arrived yet.",
        "The tracking number for order #{order} does not work.",
        "When will the {product} be delivered? I ordered it on {date}.",
        "The courier left my parcel at the wrong address in {city}.",
        "Can you deliver order #{order} to my office instead?",
        "It says shipped but nothing has moved for a week.",
        "The parcel has been in transit for {n} days now.",
        "Do you offer express shipping to {city}?",
        "The delivery for order #{order} was marked complete but I have nothing.",
        "Could the courier come after 5 pm? Nobody is home during the day.",
    ),
    "other": (
        "Do you have a physical store in {city}?",
        "I just wanted to say the {product} is fantastic.",
        "Are you hiring for remote positions?",
        "Would you like to collaborate on a blog post about {product_plural}?",
        "What are your opening hours on {weekday}?",
        "Do you offer gift wrapping for the {product}?",
        "Is the {product} available in other colors?",
        "Can I leave a review for the {product} on your site?",
        "Will the {product} be back in stock soon?",
        "Do you have a student discount?",
    ),
}

# Context that carries no intent (and matches no rule): it makes emails long and varied, as real ones are.
EMAIL_CONTEXT = (
    "I have been a loyal customer for {n} years.",
    "My order number is #{order}.",
    "I am writing from {city}.",
    "This is the second time I am contacting you about this.",
    "I bought the {product} last {weekday}.",
    "It was a birthday present for my sister.",
    "I usually love shopping with you.",
    "I hope you can help me quickly.",
    "I have attached a photo.",
    "My neighbour had the same experience last {month}.",
)
EMAIL_GREETINGS = ("Hi,", "Hello,", "Hello team,", "Dear support,", "Hi there,", "Good morning,", "Hey,", "")
EMAIL_SIGNOFFS = ("Thanks,", "Thank you,", "Best regards,", "Kind regards,", "Cheers,", "Regards,", "")
BROWSERS = ("Firefox", "Chrome", "Safari", "Edge")
DEVICES = ("iPhone", "Android phone", "tablet", "Pixel", "laptop")


def _fill_email(template: str, rng: random.Random) -> str:
    first, last = _pick(rng, FIRST_NAMES), _pick(rng, LAST_NAMES)
    product = _pick(rng, PRODUCTS)
    values = {
        "product": product,
        "product_plural": product + "s",
        "amount": f"{rng.choice(['$', '€', '£'])}{rng.randint(5, 900)}.{rng.randint(0, 99):02d}",
        "order": str(rng.randint(10000, 99999)),
        "date": f"{_pick(rng, MONTHS)} {rng.randint(1, 28)}",
        "n": str(rng.randint(2, 12)),
        "weekday": _pick(rng, WEEKDAYS),
        "month": _pick(rng, MONTHS),
        "email": f"{first.lower()}.{last.lower()}@example.com",
        "code": f"E{rng.randint(100, 999)}",
        "browser": _pick(rng, BROWSERS),
        "device": _pick(rng, DEVICES),
        "city": _pick(rng, CITIES),
    }
    return template.format(**values)


def generate_email(rng: random.Random, mix_rate: float = 0.2) -> str:
    """A customer email: greeting, some context, one or two sentences of one intent, sometimes a
    sentence of a second intent (``mix_rate``), sign-off and name."""
    intent = _pick(rng, EMAIL_LABELS)
    body = [_fill_email(_pick(rng, EMAIL_SENTENCES[intent]), rng) for _ in range(rng.choice((1, 1, 2)))]
    if rng.random() < mix_rate:
        other = _pick(rng, [label for label in EMAIL_LABELS if label not in (intent, "other")])
        body.insert(rng.randint(0, len(body)), _fill_email(_pick(rng, EMAIL_SENTENCES[other]), rng))
    for _ in range(rng.choice((0, 1, 1, 2))):
        body.insert(rng.randint(0, len(body)), _fill_email(_pick(rng, EMAIL_CONTEXT), rng))
    greeting, signoff = _pick(rng, EMAIL_GREETINGS), _pick(rng, EMAIL_SIGNOFFS)
    lines = [greeting] if greeting else []
    lines.append(" ".join(dict.fromkeys(body)))
    if signoff:
        lines.append(f"{signoff}\n{_pick(rng, FIRST_NAMES)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# crud-api: natural-language requests from an internal ops console, mapped to REST calls.
# ---------------------------------------------------------------------------------------------------

CRUD_SYSTEM_PROMPT = (
    "You translate requests from the operations team into calls to the shop's REST API. Resources: "
    "/customers, /orders, /products, /invoices, /tickets (each item at /<resource>/<id>). Answer with "
    'one JSON object: {"method": "GET|POST|PATCH|DELETE", "path": "...", "body": {...}}; omit "body" '
    'when there is none. If the request cannot be mapped, answer {"error": "unsupported request"}.'
)

RESOURCE_WORDS: dict[str, str] = {
    "order": "orders",
    "customer": "customers",
    "client": "customers",
    "product": "products",
    "item": "products",
    "invoice": "invoices",
    "bill": "invoices",
    "ticket": "tickets",
    "support ticket": "tickets",
    "case": "tickets",
}
ORDER_STATUSES = ("pending", "paid", "shipped", "delivered", "cancelled", "returned")
TICKET_STATUSES = ("open", "pending", "resolved", "closed", "escalated")
PRODUCT_NAMES = (
    "Blue Mug",
    "Travel Pillow",
    "Desk Organizer",
    "Oak Cutting Board",
    "Linen Apron",
    "Steel Bottle",
    "Wool Scarf",
    "Glass Teapot",
    "Canvas Tote",
    "Bamboo Tray",
    "Leather Wallet",
    "Cotton Throw",
    "Ceramic Vase",
    "Copper Pan",
    "Herb Planter",
    "Silk Pillowcase",
    "Marble Coaster",
    "Cast Iron Skillet",
)
TICKET_SUBJECTS = (
    "login fails",
    "late delivery",
    "wrong size",
    "damaged item",
    "double charge",
    "missing invoice",
    "app crash",
    "address change",
    "gift card not working",
    "refund delay",
    "password reset",
    "discount code rejected",
)
GET_VERBS = ("show me", "get", "fetch", "look up", "pull up", "find", "display", "retrieve")
DELETE_VERBS = ("delete", "remove", "drop", "erase")
POLITE_PREFIXES = ("", "please ", "could you ", "can you ", "hey, ", "i need you to ", "quickly ", "kindly ")
POLITE_SUFFIXES = ("", ".", " please.", ", thanks!", " asap.", ", thank you.", "?")

_SLOTS: dict[str, str] = {
    "get": _alternation(GET_VERBS),
    "delete": _alternation(DELETE_VERBS),
    "res": _alternation(list(RESOURCE_WORDS)),
    "id": r"\d+",
    "id2": r"\d+",
    "qty": r"\d+",
    "limit": r"\d+",
    "price": r"\d+\.\d\d",
    "name": r"[A-Z][a-z]+ [A-Z][a-z]+",
    "email": r"[a-z]+\.[a-z]+@example\.(?:com|org|net)",
    "city": _alternation(CITIES),
    "ostatus": _alternation(ORDER_STATUSES),
    "tstatus": _alternation(TICKET_STATUSES),
    "product": _alternation(PRODUCT_NAMES),
    "subject": _alternation(TICKET_SUBJECTS),
}

Fields = dict[str, str]


def _price(text: str) -> float:
    return float(text)


# (template, builder of the API call from the slot values). The teacher tries them in order.
CRUD_TEMPLATES: tuple[tuple[str, Callable[[Fields], dict[str, Any]]], ...] = (
    ("{get} {res} {id}", lambda f: {"method": "GET", "path": f"/{RESOURCE_WORDS[f['res']]}/{f['id']}"}),
    ("{get} {res} #{id}", lambda f: {"method": "GET", "path": f"/{RESOURCE_WORDS[f['res']]}/{f['id']}"}),
    (
        "{get} the details of {res} {id}",
        lambda f: {"method": "GET", "path": f"/{RESOURCE_WORDS[f['res']]}/{f['id']}"},
    ),
    ("what is the status of order {id}", lambda f: {"method": "GET", "path": f"/orders/{f['id']}"}),
    ("list all {ostatus} orders", lambda f: {"method": "GET", "path": f"/orders?status={f['ostatus']}"}),
    ("list the {tstatus} tickets", lambda f: {"method": "GET", "path": f"/tickets?status={f['tstatus']}"}),
    (
        "{get} the last {limit} orders of customer {id}",
        lambda f: {"method": "GET", "path": f"/customers/{f['id']}/orders?limit={int(f['limit'])}"},
    ),
    (
        "{get} all invoices for customer {id}",
        lambda f: {"method": "GET", "path": f"/customers/{f['id']}/invoices"},
    ),
    (
        "which products cost less than {price}",
        lambda f: {"method": "GET", "path": f"/products?max_price={_price(f['price'])}"},
    ),
    (
        "create a new customer named {name} with email {email}",
        lambda f: {"method": "POST", "path": "/customers", "body": {"name": f["name"], "email": f["email"]}},
    ),
    (
        "add a customer {name} ({email}) from {city}",
        lambda f: {
            "method": "POST",
            "path": "/customers",
            "body": {"name": f["name"], "email": f["email"], "city": f["city"]},
        },
    ),
    (
        "add a product called {product} priced at {price}",
        lambda f: {
            "method": "POST",
            "path": "/products",
            "body": {"name": f["product"], "price": _price(f["price"])},
        },
    ),
    (
        "open a ticket for customer {id} about {subject}",
        lambda f: {
            "method": "POST",
            "path": "/tickets",
            "body": {"customer_id": int(f["id"]), "subject": f["subject"]},
        },
    ),
    (
        "place an order of {qty} units of product {id} for customer {id2}",
        lambda f: {
            "method": "POST",
            "path": "/orders",
            "body": {"customer_id": int(f["id2"]), "product_id": int(f["id"]), "quantity": int(f["qty"])},
        },
    ),
    (
        "change the email of customer {id} to {email}",
        lambda f: {"method": "PATCH", "path": f"/customers/{f['id']}", "body": {"email": f["email"]}},
    ),
    (
        "set the quantity of order {id} to {qty}",
        lambda f: {"method": "PATCH", "path": f"/orders/{f['id']}", "body": {"quantity": int(f["qty"])}},
    ),
    (
        "mark ticket {id} as {tstatus}",
        lambda f: {"method": "PATCH", "path": f"/tickets/{f['id']}", "body": {"status": f["tstatus"]}},
    ),
    (
        "update the price of product {id} to {price}",
        lambda f: {"method": "PATCH", "path": f"/products/{f['id']}", "body": {"price": _price(f["price"])}},
    ),
    (
        "move customer {id} to {city}",
        lambda f: {"method": "PATCH", "path": f"/customers/{f['id']}", "body": {"city": f["city"]}},
    ),
    ("{delete} {res} {id}", lambda f: {"method": "DELETE", "path": f"/{RESOURCE_WORDS[f['res']]}/{f['id']}"}),
    ("cancel order {id}", lambda f: {"method": "DELETE", "path": f"/orders/{f['id']}"}),
)

_SLOT_NAME = re.compile(r"\{(\w+)\}")


def _template_regex(
    template: str, slots: dict[str, str], prefix: str = "", suffix: str = ""
) -> re.Pattern[str]:
    """The whole-text regex of a template: literal text, one named group per slot (a slot used
    twice must repeat the same words), optional ``prefix``/``suffix`` alternations around it."""
    parts: list[str] = []
    last = 0
    seen: set[str] = set()
    for match in _SLOT_NAME.finditer(template):
        name = match.group(1)
        parts.append(re.escape(template[last : match.start()]))
        parts.append(f"(?P={name})" if name in seen else f"(?P<{name}>{slots[name]})")
        seen.add(name)
        last = match.end()
    parts.append(re.escape(template[last:]))
    head = f"(?:{prefix})?" if prefix else ""
    tail = f"(?:{suffix})?" if suffix else ""
    return re.compile(f"^{head}{''.join(parts)}{tail}$", re.IGNORECASE)


CRUD_PATTERNS = [
    (
        _template_regex(
            template, _SLOTS, _alternation(POLITE_PREFIXES[1:]), _alternation(POLITE_SUFFIXES[1:])
        ),
        build,
    )
    for template, build in CRUD_TEMPLATES
]
"""The teacher's parser: each template as a whole-text regex, tried in order."""


def crud_call(request: str) -> dict[str, Any]:
    """The teacher's API call for an ops request: the first template that matches the whole text."""
    text = " ".join(request.split())
    for pattern, build in CRUD_PATTERNS:
        match = pattern.match(text)
        if match:
            # Resource words and statuses are matched case-insensitively; the API wants them lowercase.
            fields = {
                k: (v.lower() if k in ("res", "ostatus", "tstatus") else v)
                for k, v in match.groupdict().items()
            }
            return build(fields)
    return {"error": "unsupported request"}


def generate_crud_request(rng: random.Random, template_index: int | None = None) -> str:
    """An ops request: a template (random unless given), its slots filled, a polite prefix or
    suffix, casual capitalisation."""
    index = rng.randrange(len(CRUD_TEMPLATES)) if template_index is None else template_index
    template = CRUD_TEMPLATES[index][0]
    first, last = _pick(rng, FIRST_NAMES), _pick(rng, LAST_NAMES)
    values = {
        "get": _pick(rng, GET_VERBS),
        "delete": _pick(rng, DELETE_VERBS),
        "res": _pick(rng, list(RESOURCE_WORDS)),
        "id": str(rng.randint(1, 99999)),
        "id2": str(rng.randint(1, 9999)),
        "qty": str(rng.randint(1, 50)),
        "limit": str(rng.choice((3, 5, 10, 20, 25, 50))),
        "price": f"{rng.randint(1, 499)}.{rng.choice((0, 49, 50, 95, 99)):02d}",
        "name": f"{first} {last}",
        "email": f"{first.lower()}.{last.lower()}@example.{rng.choice(('com', 'org', 'net'))}",
        "city": _pick(rng, CITIES),
        "ostatus": _pick(rng, ORDER_STATUSES),
        "tstatus": _pick(rng, TICKET_STATUSES),
        "product": _pick(rng, PRODUCT_NAMES),
        "subject": _pick(rng, TICKET_SUBJECTS),
    }
    text = _pick(rng, POLITE_PREFIXES) + template.format(**values) + _pick(rng, POLITE_SUFFIXES)
    return text[0].upper() + text[1:] if rng.random() < 0.7 else text


# ---------------------------------------------------------------------------------------------------
# extract-ade: drug / adverse-event pairs from sentences of case reports (pharmacovigilance).
# ---------------------------------------------------------------------------------------------------

ADE_SYSTEM_PROMPT = (
    "You extract adverse drug events from sentences of clinical case reports. Answer with one JSON "
    'object {"pairs": [{"drug": "...", "event": "..."}]} listing each adverse event together with the '
    "drug it is attributed to, in the order the events appear, names in lowercase. Leave out events "
    'that are negated or were present before the drug, and drugs without an event. No pairs: {"pairs": []}.'
)

DRUGS = (
    "amoxicillin",
    "isoniazid",
    "lisinopril",
    "metformin",
    "simvastatin",
    "warfarin",
    "methotrexate",
    "carbamazepine",
    "allopurinol",
    "vancomycin",
    "amiodarone",
    "clozapine",
    "cisplatin",
    "lithium",
    "phenytoin",
    "ciprofloxacin",
    "ibuprofen",
    "prednisone",
    "tamoxifen",
    "rituximab",
    "valproate",
    "haloperidol",
    "digoxin",
    "heparin",
    "doxorubicin",
    "sertraline",
    "olanzapine",
    "gentamicin",
    "azathioprine",
    "spironolactone",
    "clopidogrel",
    "levetiracetam",
    "nivolumab",
    "infliximab",
)
EVENTS = (
    "rash",
    "hepatotoxicity",
    "angioedema",
    "lactic acidosis",
    "rhabdomyolysis",
    "major bleeding",
    "pancytopenia",
    "Stevens-Johnson syndrome",
    "QT prolongation",
    "agranulocytosis",
    "acute kidney injury",
    "ototoxicity",
    "hyponatremia",
    "gingival hyperplasia",
    "tendon rupture",
    "gastric ulcer",
    "hyperglycemia",
    "cardiomyopathy",
    "serotonin syndrome",
    "weight gain",
    "hyperkalemia",
    "pneumonitis",
    "thrombocytopenia",
    "pancreatitis",
    "colitis",
    "interstitial nephritis",
    "seizures",
    "tremor",
    "peripheral neuropathy",
    "alopecia",
    "hypothyroidism",
    "hearing loss",
)
INDICATIONS = (
    "hypertension",
    "rheumatoid arthritis",
    "epilepsy",
    "type 2 diabetes",
    "tuberculosis",
    "atrial fibrillation",
    "schizophrenia",
    "breast cancer",
    "gout",
    "pneumonia",
    "depression",
    "bipolar disorder",
    "Crohn's disease",
    "lymphoma",
    "heart failure",
    "melanoma",
)
DELAYS = ("two days", "three weeks", "one month", "ten days", "six months", "48 hours", "a week", "five days")

Pair = tuple[str, str]  # (drug slot, event slot)

# (template, the pairs it states as (drug slot, event slot)). Slots: {pt} patient, {d1} {d2} drugs,
# {e1} {e2} events, {ind} indication, {t} delay. The teacher tries them in order.
ADE_TEMPLATES: tuple[tuple[str, tuple[Pair, ...]], ...] = (
    ("{pt} developed {e1} {t} after starting {d1}.", (("d1", "e1"),)),
    ("{pt} on {d1} for {ind} presented with {e1} and {e2}.", (("d1", "e1"), ("d1", "e2"))),
    ("{d1}-induced {e1} was diagnosed in {pt}.", (("d1", "e1"),)),
    ("{e1} was attributed to {d1}; {d2} was continued without problems.", (("d1", "e1"),)),
    ("{pt} taking {d1} reported {e1} but denied {e2}.", (("d1", "e1"),)),
    ("No {e1} was observed in {pt} treated with {d1}.", ()),
    ("{pt} received {d1} and {d2}; {e1} resolved after {d2} was withdrawn.", (("d2", "e1"),)),
    ("{pt} with a history of {e1} was started on {d1} for {ind}.", ()),
    ("{pt} developed {e1} while on {d1}, and later {e2} after {d2} was added.", (("d1", "e1"), ("d2", "e2"))),
    ("We report a case of {e1} associated with {d1} in {pt} treated for {ind}.", (("d1", "e1"),)),
    ("{pt} was switched from {d1} to {d2} because of {e1}.", (("d1", "e1"),)),
    ("{e1} and {e2} occurred {t} after the first dose of {d1}.", (("d1", "e1"), ("d1", "e2"))),
    ("{pt} tolerated {d1} well for {t} and had no {e1}.", ()),
    ("Rechallenge with {d1} caused recurrent {e1} in {pt}.", (("d1", "e1"),)),
)

_ADE_SLOTS = {
    "pt": r"(?:an? |the )?[\w -]+?",
    "d1": _alternation(DRUGS),
    "d2": _alternation(DRUGS),
    "e1": _alternation(EVENTS),
    "e2": _alternation(EVENTS),
    "ind": _alternation(INDICATIONS),
    "t": _alternation(DELAYS),
}


ADE_PATTERNS = [(_template_regex(template, _ADE_SLOTS), pairs) for template, pairs in ADE_TEMPLATES]


def extract_ade(sentence: str) -> dict[str, Any]:
    """The teacher's drug/adverse-event pairs for a sentence (``{"pairs": []}`` when it states none)."""
    text = " ".join(sentence.split())
    for pattern, pairs in ADE_PATTERNS:
        match = pattern.match(text)
        if match:
            return {"pairs": [{"drug": match[d].lower(), "event": match[e].lower()} for d, e in pairs]}
    return {"pairs": []}


def _patient(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.6:
        age = rng.randint(2, 92)
        noun = rng.choice(("man", "woman")) if age >= 18 else rng.choice(("boy", "girl"))
        article = "an" if str(age).startswith("8") or age in (11, 18) else "a"
        return f"{article} {age}-year-old {noun}"
    return _pick(
        rng,
        (
            "the patient",
            "an elderly man",
            "an elderly woman",
            "a pregnant woman",
            "a young athlete",
            "a nursing home resident",
        ),
    )


def generate_ade_sentence(rng: random.Random, template_index: int | None = None) -> str:
    """A case-report sentence from one of the templates (random unless given), with distinct drugs
    and events."""
    index = rng.randrange(len(ADE_TEMPLATES)) if template_index is None else template_index
    template = ADE_TEMPLATES[index][0]
    d1, d2 = rng.sample(DRUGS, 2)
    e1, e2 = rng.sample(EVENTS, 2)
    text = template.format(
        pt=_patient(rng), d1=d1, d2=d2, e1=e1, e2=e2, ind=_pick(rng, INDICATIONS), t=_pick(rng, DELAYS)
    )
    return text[0].upper() + text[1:]


# ---------------------------------------------------------------------------------------------------
# The workload and the teacher's dispatcher.
# ---------------------------------------------------------------------------------------------------

CLASSIFY_EMAIL = TaskFamily(
    name="classify-email",
    system_prompt=EMAIL_SYSTEM_PROMPT,
    scorer="exact",
    generate=generate_email,
    answer_text=classify_email,
    json_mode=False,
    max_tokens=8,
    tagged=True,
)
CRUD_API = TaskFamily(
    name="crud-api",
    system_prompt=CRUD_SYSTEM_PROMPT,
    scorer="json_fields",
    generate=generate_crud_request,
    answer_text=lambda text: _dumps(crud_call(text)),
    json_mode=True,
    max_tokens=96,
    tagged=False,
)
EXTRACT_ADE = TaskFamily(
    name="extract-ade",
    system_prompt=ADE_SYSTEM_PROMPT,
    scorer="json_fields",
    generate=generate_ade_sentence,
    answer_text=lambda text: _dumps(extract_ade(text)),
    json_mode=True,
    max_tokens=96,
    tagged=True,
)

FAMILIES: tuple[TaskFamily, ...] = (CLASSIFY_EMAIL, CRUD_API, EXTRACT_ADE)
TASK_NAMES: tuple[str, ...] = tuple(family.name for family in FAMILIES)
SCORERS: dict[str, Scorer] = {family.name: family.scorer for family in FAMILIES}
"""The recommended promotion scorer per task name."""

_BY_NAME = {family.name: family for family in FAMILIES}
_BY_PROMPT = {" ".join(family.system_prompt.split()): family for family in FAMILIES}
_BY_KEY = {family.task_key: family for family in FAMILIES}


def family(name_or_key: str) -> TaskFamily:
    """A family by its name or by the task key the gateway gives its records; KeyError if none."""
    found = _BY_NAME.get(name_or_key) or _BY_KEY.get(name_or_key)
    if found is None:
        raise KeyError(name_or_key)
    return found


def family_of(body: dict[str, Any]) -> TaskFamily | None:
    """The family a chat request belongs to: by ``metadata.task``, else by its system prompt."""
    task = (body.get("metadata") or {}).get("task")
    if isinstance(task, str) and task in _BY_NAME:
        return _BY_NAME[task]
    for message in body.get("messages") or []:
        if message.get("role") in ("system", "developer"):
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            return _BY_PROMPT.get(" ".join(str(content or "").split()))
    return None


def answer(body: dict[str, Any]) -> dict[str, Any] | None:
    """The scripted teacher's answer to a workload request; None for anything else (the teacher's
    default answer then applies). Pass as ``ScriptedTeacher(answer_fn=answer)``."""
    found = family_of(body)
    return found.answer(body) if found is not None else None


def traffic(
    seed: int, n: int, families: Sequence[TaskFamily] = FAMILIES, weights: Sequence[float] | None = None
) -> Iterator[tuple[TaskFamily, dict[str, Any]]]:
    """``n`` requests interleaving ``families`` (equally unless ``weights``), reproducible from ``seed``."""
    rng = random.Random(f"traffic:{seed}")
    chosen = list(families)
    for _ in range(n):
        picked = rng.choices(chosen, weights=weights)[0] if weights else chosen[rng.randrange(len(chosen))]
        yield picked, picked.request(rng)
