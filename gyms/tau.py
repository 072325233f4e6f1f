"""TauGym: customer service over a small online store of our own, with the tools a support agent calls on it and
tasks scored by the final database (UserRL, arXiv 2509.19736, section 3, TauGym; the design follows tau-bench's
retail domain).

The database (users with addresses and payment methods, products with variants, orders with payment
histories) is generated from a seed at load time, so nothing large is stored: each task carries the seed and
a fingerprint of the database it was written against, and a session refuses a task whose fingerprint no longer
matches. A task holds the customer's instruction (for an LLM customer), the facts a scripted customer needs,
the write actions a correct agent performs, and the values the agent must tell the customer. The reward is
tau-bench's: 1 when the final database equals the one those actions produce from the initial database and
every required value appears in the agent's messages, else 0.

    python -m gyms.tau      # regenerate data/tau/{train,test}.jsonl (byte-identical: fixed seeds)

Policies, as the system prompt states them: identify the customer (by email, or by name and zip code) before
looking at or changing their account, which the tools enforce; act only on that customer's orders; confirm a
change with the customer before making it, which the tools cannot see and the reward checks through its result.

As in the original, the reward is paid only when the tau episode is done: the customer ends the conversation or
the agent transfers them to a human. [finish] pays the last tau reward, which is 0 unless the episode was done
(and then it had already ended), and the turn limit pays 0. The customer's role is "tau.customer".
"""
import copy
import hashlib
import json
import random
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from envs import FOOTER, Env, TaskDataError, expert_turn
from users import mentions

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "tau"
DB_SEED = 0
N_USERS = 260
SPLITS = {"train": (1, 150, range(0, 200)), "test": (2, 50, range(200, N_USERS))}  # seed, tasks, users
STOP = "###STOP###"  # the customer's end-of-conversation marker (tau-bench's convention)

# ----------------------------------------------------------------------------------------------------------
# The database

PRODUCTS = {  # name -> option dimensions, price range
    "Trail Jacket": ({"color": ["black", "navy", "olive", "red"], "size": ["S", "M", "L", "XL"]}, (80, 160)),
    "Running Shoes": ({"color": ["white", "black", "blue"], "size": ["7", "8", "9", "10", "11"]}, (60, 140)),
    "Desk Lamp": ({"finish": ["brass", "black", "white"], "bulb": ["LED", "halogen"]}, (25, 70)),
    "Water Bottle": ({"capacity": ["500ml", "750ml", "1l"], "color": ["green", "gray", "orange"]}, (12, 35)),
    "Backpack": ({"capacity": ["20l", "30l", "40l"], "color": ["black", "navy", "sand"]}, (45, 120)),
    "Wireless Earbuds": ({"color": ["black", "white", "blue"], "battery": ["6h", "10h"]}, (40, 150)),
    "Coffee Grinder": ({"type": ["manual", "electric"], "capacity": ["150g", "250g"]}, (30, 110)),
    "Yoga Mat": ({"thickness": ["4mm", "6mm", "8mm"], "color": ["purple", "teal", "black"]}, (20, 60)),
    "Office Chair": ({"material": ["mesh", "leather", "fabric"], "color": ["black", "gray"]}, (120, 380)),
    "Tea Kettle": ({"material": ["steel", "glass", "ceramic"], "capacity": ["1l", "1.5l"]}, (25, 80)),
    "Sunglasses": ({"frame": ["metal", "acetate"], "lens": ["polarized", "standard"]}, (30, 140)),
    "Phone Case": ({"model": ["P10", "P11", "P12"], "color": ["clear", "black", "pink"]}, (10, 40)),
    "Camping Tent": ({"size": ["2-person", "4-person"], "season": ["3-season", "4-season"]}, (90, 330)),
    "Bluetooth Speaker": ({"color": ["black", "red", "blue"], "waterproof": ["yes", "no"]}, (35, 130)),
    "Wall Clock": ({"style": ["modern", "classic"], "diameter": ["25cm", "35cm"]}, (20, 75)),
    "Cotton T-Shirt": ({"color": ["white", "black", "green", "navy"], "size": ["S", "M", "L", "XL"]}, (12, 30)),
}
FIRST = ["Maya", "Liam", "Noah", "Emma", "Olivia", "Ava", "Ethan", "Lucas", "Mia", "Amara", "Yusuf", "Chen",
         "Priya", "Mateo", "Sofia", "Kenji", "Ines", "Omar", "Leila", "Jonas", "Hana", "Ravi", "Elena", "Tomas"]
LAST = ["Lopez", "Nguyen", "Smith", "Okafor", "Kowalski", "Haddad", "Silva", "Kim", "Patel", "Moreau",
        "Schmidt", "Rossi", "Tanaka", "Ahmed", "Johansson", "Garcia", "Brown", "Ivanova", "Mensah", "Costa"]
STREETS = ["Oak Street", "Maple Avenue", "Cedar Lane", "Elm Road", "Pine Court", "Willow Way", "Lake Drive",
           "Hill Street", "River Road", "Park Avenue", "Birch Lane", "Sunset Boulevard"]
PLACES = [("Fairview", "OH"), ("Riverton", "WY"), ("Greenville", "SC"), ("Madison", "WI"), ("Salem", "OR"),
          ("Franklin", "TN"), ("Clinton", "IA"), ("Bristol", "CT"), ("Georgetown", "TX"), ("Dover", "DE"),
          ("Auburn", "AL"), ("Milford", "MA")]
REASONS = ["no longer needed", "ordered by mistake"]


def _address(rng) -> dict:
    city, state = rng.choice(PLACES)
    street = f"{rng.randint(10, 9999)} {rng.choice(STREETS)}"
    unit = rng.choice(["", "", f"Apt {rng.randint(1, 40)}{rng.choice('ABC')}", f"Suite {rng.randint(100, 900)}"])
    return {"address1": street, "address2": unit, "city": city, "state": state, "country": "USA",
            "zip": f"{rng.randint(10000, 99999)}"}


def make_db(seed: int = DB_SEED) -> dict:
    """The whole store: {"products", "users", "orders"}, a pure function of `seed`."""
    rng = random.Random(seed)
    ids = iter(rng.sample(range(1_000_000, 10_000_000), 5000))  # distinct 7-digit numbers for every id kind
    products, variants = {}, []
    for name, (dims, (lo, hi)) in PRODUCTS.items():
        pid = f"P{next(ids)}"
        combos = [{}]
        for dim, values in dims.items():
            combos = [{**c, dim: v} for c in combos for v in values]
        items = {}
        for options in combos:
            if rng.random() < 0.85:  # not every combination is sold
                iid = str(next(ids))
                items[iid] = {"options": options, "available": rng.random() < 0.8,
                              "price": round(rng.uniform(lo, hi), 2)}
                variants.append((pid, iid))
        products[pid] = {"name": name, "variants": items}
    users, orders = {}, {}
    for n in range(N_USERS):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        uid = f"{first}_{last}_{n:04d}".lower()
        methods = {}
        for source in rng.sample(["credit_card", "paypal", "gift_card"], rng.randint(1, 3)):
            pm = f"{source}_{next(ids)}"
            if source == "credit_card":
                methods[pm] = {"source": source, "brand": rng.choice(["visa", "mastercard", "amex"]),
                               "last_four": f"{rng.randint(0, 9999):04d}"}
            elif source == "gift_card":
                methods[pm] = {"source": source, "balance": float(rng.randint(0, 300))}
            else:
                methods[pm] = {"source": source}
        address = _address(rng)
        users[uid] = {"name": {"first_name": first, "last_name": last},
                      "email": f"{first}.{last}{n}@example.com".lower(), "address": address,
                      "payment_methods": methods, "orders": []}
        for _ in range(rng.randint(1, 4)):
            oid = f"#R{next(ids)}"
            items = []
            for pid, iid in rng.sample(variants, rng.randint(1, 4)):
                v = products[pid]["variants"][iid]
                items.append({"item_id": iid, "product_id": pid, "name": products[pid]["name"],
                              "options": v["options"], "price": v["price"]})
            total = round(sum(i["price"] for i in items), 2)
            orders[oid] = {"user_id": uid, "status": rng.choice(["pending", "pending", "processed", "delivered",
                                                                  "delivered", "cancelled"]),
                           "address": address if rng.random() < 0.8 else _address(rng), "items": items,
                           "payment_history": [{"type": "payment", "amount": total,
                                                "payment_method_id": rng.choice(list(methods))}]}
            users[uid]["orders"].append(oid)
    return {"products": products, "users": users, "orders": orders}


@lru_cache(maxsize=4)
def _base(seed: int) -> tuple:
    db = make_db(seed)
    return db, hashlib.sha256(json.dumps(db, sort_keys=True).encode()).hexdigest()[:16]


def fresh_db(seed: int = DB_SEED) -> dict:
    """The initial database for one episode. Its records are shared with a cached original until written:
    RetailWorld copies a user or an order before changing it, so an episode (and the reward's replay of the
    expected actions) costs well under a millisecond, not a 0.5 MB deep copy, and comparing two databases only
    walks the records that differ."""
    base = _base(seed)[0]
    return {"products": base["products"], "users": dict(base["users"]), "orders": dict(base["orders"])}


def db_fingerprint(seed: int = DB_SEED) -> str:
    """Names the initial database; a task records the one it was written against."""
    return _base(seed)[1]


# ----------------------------------------------------------------------------------------------------------
# Tools. Each raises ToolError on bad input; RetailWorld.call turns every problem into the tool's error text.


class ToolError(Exception):
    pass


@dataclass(frozen=True)
class Tool:
    fn: object
    description: str
    params: dict
    """argument name -> (type: "string" or "array", description)"""


ADDRESS = {"address1": ("string", "street address"), "address2": ("string", "apartment or suite, may be empty"),
           "city": ("string", "city"), "state": ("string", "state code"), "country": ("string", "country"),
           "zip": ("string", "zip code")}


class RetailWorld:
    """The database plus who this conversation has identified. `call(name, arguments)` never raises."""

    def __init__(self, db: dict):
        self.db = db
        self.identified = set()  # user ids the agent has looked up by email or by name and zip
        self.owned = set()  # (table, key) of the records this world has copied and may change

    def _writable(self, table: str, key: str) -> dict:
        if (table, key) not in self.owned:  # records start shared with other episodes (see fresh_db)
            self.db[table][key] = copy.deepcopy(self.db[table][key])
            self.owned.add((table, key))
        return self.db[table][key]

    def call(self, name, arguments) -> str:
        if not isinstance(name, str) or name not in TOOLS:
            return f"Error: unknown tool {str(name)[:60]!r}. Available tools: {', '.join(TOOLS)}."
        tool = TOOLS[name]
        if not isinstance(arguments, dict):
            return f"Error: the arguments of {name} must be a JSON object."
        missing = [p for p in tool.params if p not in arguments]
        extra = [str(p)[:40] for p in arguments if p not in tool.params]
        if missing or extra:
            return (f"Error: {name} takes arguments ({', '.join(tool.params)}); "
                    + (f"missing: {', '.join(missing)}" if missing else f"unexpected: {', '.join(extra)}") + ".")
        for p, (kind, _) in tool.params.items():
            v = arguments[p]
            if kind == "string" and not isinstance(v, str):
                return f"Error: argument {p!r} of {name} must be a string."
            if kind == "array" and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                return f"Error: argument {p!r} of {name} must be a list of strings."
        try:
            return tool.fn(self, **arguments)
        except ToolError as e:
            return f"Error: {e}"

    # --- lookups

    def _user(self, user_id: str) -> dict:
        if user_id not in self.db["users"]:
            raise ToolError(f"user {user_id[:60]!r} not found")
        if user_id not in self.identified:
            raise ToolError("identify the customer first (find_user_id_by_email or find_user_id_by_name_zip)")
        return self.db["users"][user_id]

    def _order(self, order_id: str, status: str | None = None) -> dict:
        order = self.db["orders"].get(order_id)
        if order is None:
            raise ToolError(f"order {order_id[:60]!r} not found")
        self._user(order["user_id"])
        if status is not None and order["status"] != status:
            raise ToolError(f"order {order_id} is {order['status']}, not {status}")
        return order

    def find_user_id_by_email(self, email):
        for uid, u in self.db["users"].items():
            if u["email"] == email.strip().lower():
                self.identified.add(uid)
                return uid
        raise ToolError("no user with that email")

    def find_user_id_by_name_zip(self, first_name, last_name, zip):
        for uid, u in self.db["users"].items():
            if ((u["name"]["first_name"].lower(), u["name"]["last_name"].lower(), u["address"]["zip"])
                    == (first_name.strip().lower(), last_name.strip().lower(), zip.strip())):
                self.identified.add(uid)
                return uid
        raise ToolError("no user with that name and zip code")

    def get_user_details(self, user_id):
        return json.dumps(self._user(user_id))

    def get_order_details(self, order_id):
        return json.dumps({"order_id": order_id, **self._order(order_id)})

    def get_product_details(self, product_id):
        if product_id not in self.db["products"]:
            raise ToolError(f"product {product_id[:60]!r} not found")
        return json.dumps({"product_id": product_id, **self.db["products"][product_id]})

    def list_all_product_types(self):
        return json.dumps({p["name"]: pid for pid, p in self.db["products"].items()})

    # --- changes

    def cancel_pending_order(self, order_id, reason):
        order = self._order(order_id, "pending")
        if reason not in REASONS:
            raise ToolError(f"reason must be one of: {', '.join(REASONS)}")
        order = self._writable("orders", order_id)
        methods = self._writable("users", order["user_id"])["payment_methods"]
        for pay in [p for p in order["payment_history"] if p["type"] == "payment"]:
            order["payment_history"].append({"type": "refund", "amount": pay["amount"],
                                             "payment_method_id": pay["payment_method_id"]})
            method = methods.get(pay["payment_method_id"], {})
            if method.get("source") == "gift_card":  # gift cards are refunded at once
                method["balance"] = round(method["balance"] + pay["amount"], 2)
        order["status"], order["cancel_reason"] = "cancelled", reason
        return self.get_order_details(order_id)

    def modify_pending_order_address(self, order_id, **address):  # `call` has checked the ADDRESS fields
        self._order(order_id, "pending")
        self._writable("orders", order_id)["address"] = {k: address[k] for k in ADDRESS}
        return self.get_order_details(order_id)

    def modify_user_address(self, user_id, **address):
        self._user(user_id)
        self._writable("users", user_id)["address"] = {k: address[k] for k in ADDRESS}
        return self.get_user_details(user_id)

    def _items_in(self, order, item_ids):
        if not item_ids:
            raise ToolError("item_ids is empty")
        held = [i["item_id"] for i in order["items"]]
        for iid in item_ids:
            if iid not in held:
                raise ToolError(f"item {iid[:40]!r} is not in the order (or listed too many times)")
            held.remove(iid)
        return [next(i for i in order["items"] if i["item_id"] == iid) for iid in item_ids]

    def return_delivered_order_items(self, order_id, item_ids, payment_method_id):
        order = self._order(order_id, "delivered")
        self._items_in(order, item_ids)
        methods = self.db["users"][order["user_id"]]["payment_methods"]
        original = order["payment_history"][0]["payment_method_id"]
        if payment_method_id != original and methods.get(payment_method_id, {}).get("source") != "gift_card":
            raise ToolError("a refund goes to the original payment method or to one of the customer's gift cards")
        self._writable("orders", order_id).update(status="return requested", return_items=sorted(item_ids),
                                                  return_payment_method_id=payment_method_id)
        return self.get_order_details(order_id)

    def exchange_delivered_order_items(self, order_id, item_ids, new_item_ids, payment_method_id):
        order = self._order(order_id, "delivered")
        old = self._items_in(order, item_ids)
        if len(new_item_ids) != len(item_ids):
            raise ToolError("item_ids and new_item_ids must have the same length")
        diff = 0.0
        for item, new in zip(old, new_item_ids):
            variant = self.db["products"][item["product_id"]]["variants"].get(new)
            if variant is None or new == item["item_id"]:
                raise ToolError(f"{new[:40]!r} is not another variant of {item['name']}")
            if not variant["available"]:
                raise ToolError(f"item {new} is not available")
            diff += variant["price"] - item["price"]
        method = self.db["users"][order["user_id"]]["payment_methods"].get(payment_method_id)
        if method is None:
            raise ToolError(f"payment method {payment_method_id[:60]!r} not found for this customer")
        diff = round(diff, 2)
        if method["source"] == "gift_card":
            if method["balance"] < diff:
                raise ToolError("the gift card balance does not cover the price difference")
            method = self._writable("users", order["user_id"])["payment_methods"][payment_method_id]
            method["balance"] = round(method["balance"] - diff, 2)
        self._writable("orders", order_id).update(status="exchange requested", exchange_items=sorted(item_ids),
                     exchange_new_items=sorted(new_item_ids), exchange_payment_method_id=payment_method_id,
                     exchange_price_difference=diff)
        return self.get_order_details(order_id)

    def transfer_to_human_agents(self, summary):
        return "Transfer successful. A human agent will take over this conversation."


W = RetailWorld
ORDER = {"order_id": ("string", "order id, e.g. #R1234567")}
TOOLS = {
    "find_user_id_by_email": Tool(
        W.find_user_id_by_email, "Find a customer's user id by email; this identifies the customer.",
        {"email": ("string", "the customer's email")}),
    "find_user_id_by_name_zip": Tool(
        W.find_user_id_by_name_zip, "Find a customer's user id by full name and zip code; this identifies them.",
        {"first_name": ("string", "first name"), "last_name": ("string", "last name"),
         "zip": ("string", "zip code of the customer's address")}),
    "get_user_details": Tool(
        W.get_user_details, "A customer's profile, payment methods and order ids.",
        {"user_id": ("string", "user id")}),
    "get_order_details": Tool(W.get_order_details, "An order's status, address, items and payments.", ORDER),
    "get_product_details": Tool(
        W.get_product_details, "A product's variants with their options, price and availability.",
        {"product_id": ("string", "product id")}),
    "list_all_product_types": Tool(W.list_all_product_types, "Every product name with its product id.", {}),
    "cancel_pending_order": Tool(
        W.cancel_pending_order, "Cancel a pending order; its payments are refunded to where they came from.",
        {**ORDER, "reason": ("string", "'no longer needed' or 'ordered by mistake'")}),
    "modify_pending_order_address": Tool(
        W.modify_pending_order_address, "Change the shipping address of a pending order.", {**ORDER, **ADDRESS}),
    "modify_user_address": Tool(
        W.modify_user_address, "Change a customer's default address.", {"user_id": ("string", "user id"), **ADDRESS}),
    "return_delivered_order_items": Tool(
        W.return_delivered_order_items,
        "Request the return of items of a delivered order; the refund goes to the original payment method or to "
        "a gift card.",
        {**ORDER, "item_ids": ("array", "item ids to return"),
         "payment_method_id": ("string", "where the refund goes")}),
    "exchange_delivered_order_items": Tool(
        W.exchange_delivered_order_items,
        "Exchange items of a delivered order for other variants of the same products; the price difference is "
        "charged or refunded.",
        {**ORDER, "item_ids": ("array", "item ids to exchange"),
         "new_item_ids": ("array", "the new item ids, in the same order"),
         "payment_method_id": ("string", "pays or receives the difference")}),
    "transfer_to_human_agents": Tool(
        W.transfer_to_human_agents, "Hand the conversation to a human; only for requests the tools cannot serve.",
        {"summary": ("string", "a summary of the customer's issue")}),
}


def tools_text() -> str:
    """The tool list the agent sees after `[search] tools`."""
    lines = []
    for name, t in TOOLS.items():
        args = ", ".join(f"{p}: {kind} ({desc})" for p, (kind, desc) in t.params.items())
        lines.append(f"- {name}({args}): {t.description}")
    return ("Tools (call one with [answer] {\"name\": ..., \"arguments\": {...}}):\n" + "\n".join(lines))


HELP = ("Each turn, call interact_with_env with one choice: search with \"tools\" lists the store's tools (or "
        "\"help\" shows this); action sends a message to the customer; answer calls one tool, written as "
        "{\"name\": <tool>, \"arguments\": {...}}. Work out which tool settles the customer's request, then what "
        "its arguments need, and get each from another tool or by asking the customer.")


def parse_tool_call(content: str):
    """(name, arguments) from `{"name": ..., "arguments": {...}}` or `name: {...}`; raises ValueError naming the
    problem."""
    content = content.strip()
    m = re.match(r"^([A-Za-z_]\w*)\s*:\s*(\{.*\})\s*$", content, re.S)  # the colon and arguments: as the original
    try:
        if m and content[0] != "{":
            return m.group(1), json.loads(m.group(2))
        call = json.loads(content)
    except (ValueError, RecursionError):
        raise ValueError('the tool call is not valid JSON; write {"name": "<tool>", "arguments": {...}}') from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise ValueError('write the tool call as {"name": "<tool>", "arguments": {...}}')
    args = call.get("arguments", {})
    if isinstance(args, str):  # arguments encoded twice
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            raise ValueError("the arguments are not valid JSON") from None
    return call["name"], args


# ----------------------------------------------------------------------------------------------------------
# Tasks


def describe(item: dict) -> str:
    opts = ", ".join(f"{k}: {v}" for k, v in item["options"].items())
    return f"{item['name']} ({opts})"


def payment_words(method: dict) -> str:
    if method["source"] == "credit_card":
        return f"my {method['brand']} card ending in {method['last_four']}"
    return "my gift card" if method["source"] == "gift_card" else "my paypal account"


def _request(rng, db, uid, kind):
    """A request of `kind` for user `uid`: (facts for the customer, an instruction clause, write actions,
    outputs), or None when the user's orders do not allow it."""
    user = db["users"][uid]
    mine = {o: db["orders"][o] for o in user["orders"]}
    pending = [o for o, d in mine.items() if d["status"] == "pending"]
    delivered = [o for o, d in mine.items() if d["status"] == "delivered"]
    if kind == "cancel" and pending:
        oid, reason = rng.choice(pending), rng.choice(REASONS)
        said = {"no longer needed": "you no longer need it", "ordered by mistake": "you ordered it by mistake"}
        return ({"kind": kind, "order_id": oid, "reason": reason},
                f"cancel your pending order {oid} because {said[reason]}",
                [("cancel_pending_order", {"order_id": oid, "reason": reason})], [])
    if kind == "order_address" and pending:
        oid, addr = rng.choice(pending), _address(rng)
        return ({"kind": kind, "order_id": oid, "address": addr},
                f"have order {oid} shipped to {_flat(addr)} instead",
                [("modify_pending_order_address", {"order_id": oid, **addr})], [])
    if kind == "user_address":
        addr = _address(rng)
        return ({"kind": kind, "address": addr}, f"change the default address on your account to {_flat(addr)}",
                [("modify_user_address", {"user_id": uid, **addr})], [])
    if kind == "return" and delivered:
        oid = rng.choice(delivered)
        items = rng.sample(mine[oid]["items"], rng.randint(1, len(mine[oid]["items"])))
        cards = [p for p, m in user["payment_methods"].items() if m["source"] == "gift_card"]
        original = mine[oid]["payment_history"][0]["payment_method_id"]
        to = rng.choice(cards) if cards and rng.random() < 0.5 else original
        words = "gift card" if to in cards else "original payment method"
        listed = "; ".join(describe(i) for i in items)
        return ({"kind": kind, "order_id": oid, "items": [describe(i) for i in items], "refund": f"the {words}"},
                f"return {listed} from order {oid}, with the refund going to your {words}",
                [("return_delivered_order_items", {"order_id": oid, "item_ids": sorted(i["item_id"] for i in items),
                                                   "payment_method_id": to})], [])
    if kind == "exchange" and delivered:
        oid = rng.choice(delivered)
        for item in rng.sample(mine[oid]["items"], len(mine[oid]["items"])):
            variants = db["products"][item["product_id"]]["variants"]
            swaps = [(iid, v) for iid, v in variants.items() if iid != item["item_id"] and v["available"]
                     and sum(v["options"][k] != item["options"][k] for k in v["options"]) == 1]
            if swaps:
                new_id, new = rng.choice(swaps)
                dim = next(k for k in new["options"] if new["options"][k] != item["options"][k])
                payers = [(p, m) for p, m in user["payment_methods"].items()
                          if m["source"] != "gift_card" or m["balance"] >= new["price"] - item["price"]]
                if not payers:
                    continue
                pid, method = rng.choice(payers)
                want, words = f"{dim} {new['options'][dim]}", payment_words(method)
                action = {"order_id": oid, "item_ids": [item["item_id"]], "new_item_ids": [new_id],
                          "payment_method_id": pid}
                return ({"kind": kind, "order_id": oid, "items": [describe(item)], "want": want, "payment": words},
                        f"exchange the {describe(item)} from order {oid} for the same item with {want}, settling "
                        f"any price difference with {words.replace('my ', 'your ', 1)}",
                        [("exchange_delivered_order_items", action)], [])
    if kind == "total" and user["orders"]:
        oid = rng.choice(user["orders"])
        total = f"{mine[oid]['payment_history'][0]['amount']:.2f}"
        return ({"kind": kind, "order_id": oid}, f"find out how much you paid in total for order {oid}", [], [total])
    return None


def _flat(addr: dict) -> str:
    return ", ".join(v for k, v in addr.items() if v and k != "country") + ", USA"


KINDS = ["cancel", "order_address", "user_address", "return", "exchange", "total"]


def make_task(rng, db: dict, uid: str, task_id: str):
    """One task for user `uid`: one request, or two on different orders; None if nothing fits."""
    kinds = rng.sample(KINDS, len(KINDS))
    first = next((r for r in (_request(rng, db, uid, k) for k in kinds) if r), None)
    if first is None:
        return None
    requests = [first]
    if rng.random() < 0.25:  # a second request about another order
        second = next((r for r in (_request(rng, db, uid, k) for k in ["cancel", "return", "exchange"])
                       if r and r[0].get("order_id") not in (None, first[0].get("order_id"))), None)
        requests += [second] if second else []
    user = db["users"][uid]
    first_name, last_name = user["name"]["first_name"], user["name"]["last_name"]
    key = (user["name"], user["address"]["zip"])
    twins = [u for u in db["users"].values() if (u["name"], u["address"]["zip"]) == key]
    by_email = rng.random() < 0.6 or len(twins) > 1  # a name and zip code must point at one customer
    who = (f"Your email is {user['email']}." if by_email else
           f"You do not remember your email; you can give your name and your zip code, {user['address']['zip']}.")
    instruction = (f"You are {first_name} {last_name}, a customer of an online store. {who} You want to "
                   + " and then ".join(r[1] for r in requests) + ". Give details only when the agent asks for "
                   "them, and agree when the agent asks you to confirm a change that matches what you want.")
    customer = {"first_name": first_name, "last_name": last_name, "email": user["email"],
                "zip": user["address"]["zip"], "identify_by": "email" if by_email else "name_zip",
                "requests": [r[0] for r in requests], "outputs": [o for r in requests for o in r[3]]}
    actions = [{"name": n, "arguments": a} for r in requests for n, a in r[2]]
    return {"id": task_id, "db_seed": DB_SEED, "db_sha": db_fingerprint(DB_SEED), "user_id": uid,
            "instruction": instruction, "customer": customer, "actions": actions, "outputs": customer["outputs"]}


def generate(split: str) -> list:
    seed, n, users = SPLITS[split]
    rng, db = random.Random(seed), fresh_db()
    uids = list(db["users"])
    pool = [uids[i] for i in users]
    rng.shuffle(pool)
    first = 1 if split == "train" else SPLITS["train"][1] + 1
    # One task per customer, so tasks never touch the same records, and one copy of the database can check
    # that every task's expected actions succeed.
    check = RetailWorld(fresh_db())
    check.identified = set(check.db["users"])
    tasks = []
    for uid in pool:
        t = make_task(rng, db, uid, f"tau-{first + len(tasks):04d}")
        if t:
            errors = [out for a in t["actions"] if (out := check.call(a["name"], a["arguments"])).startswith("Error")]
            if errors:
                raise RuntimeError(f"{t['id']}: an expected action fails: {errors[0]}")
            tasks.append(t)
        if len(tasks) == n:
            return tasks
    raise RuntimeError(f"only {len(tasks)} tau {split} tasks could be made; add users")


def dumps(tasks: list) -> str:
    return "".join(json.dumps(t, ensure_ascii=False, separators=(",", ":")) + "\n" for t in tasks)


def expected_db(task: dict) -> dict:
    """The database a correct agent leaves: the task's write actions applied to the initial database."""
    world = RetailWorld(fresh_db(task["db_seed"]))
    world.identified = set(world.db["users"])
    for a in task["actions"]:
        out = world.call(a["name"], a["arguments"])
        if out.startswith("Error"):
            raise ValueError(f"task {task['id']}: expected action {a['name']} fails: {out}")
    return world.db


def _normal(text: str) -> str:
    return text.lower().replace(",", "")


def reward(db: dict, task: dict, agent_messages: list) -> float:
    """tau-bench's rule: 1 when the database equals the expected one and every required output was said."""
    said = _normal(" ".join(agent_messages))
    return float(db == expected_db(task) and all(_normal(o) in said for o in task["outputs"]))


# ----------------------------------------------------------------------------------------------------------
# The customer: a scripted rule, and the prompt for an LLM customer


DONE_WORDS = ("successfully", "has been cancelled", "has been canceled", "has been updated", "has been changed",
              "has been requested", "has been submitted", "have been requested", "is now", "done", "completed")


def customer_rule(customer: dict, history: list) -> str:
    """The scripted customer's next message, from its facts and the agent's messages so far (the last one is
    the one to answer). It stops once a required value was said, or once every request's order (or address)
    was named in a message reporting something done; else it answers what was asked and says yes to a
    confirmation; anything else gets the whole request restated."""
    reqs = customer["requests"]
    if not history:
        return "Hi, I need some help with " + ("my orders." if len(reqs) > 1 else {
            "cancel": "cancelling an order.", "order_address": "the shipping address of an order.",
            "user_address": "my account's address.", "return": "returning some items.",
            "exchange": "exchanging an item.", "total": "a question about an order."}[reqs[0]["kind"]])
    last = history[-1]
    if customer["outputs"] and all(_normal(o) in _normal(" ".join(history)) for o in customer["outputs"]):
        return "Thank you, that's what I wanted to know. " + STOP
    finished = [m for m in history if mentions(m, DONE_WORDS)]
    if finished and mentions(last, DONE_WORDS) and all(
            any((r.get("order_id") or "address").lower() in m.lower() for m in finished) for r in reqs):
        return "That's everything, thank you! " + STOP
    if mentions(last, ["email", "zip", "zip code", "verify", "identify", "identity", "authenticate", "your name",
                       "full name"]):
        if customer["identify_by"] == "email":
            return f"My email is {customer['email']}."
        return (f"I don't remember which email I used. My name is {customer['first_name']} "
                f"{customer['last_name']} and my zip code is {customer['zip']}.")
    if mentions(last, ["confirm", "proceed", "go ahead", "shall i", "should i", "would you like me", "yes or no"]):
        return "Yes, please go ahead."
    orders = [r["order_id"] for r in reqs if "order_id" in r]
    if orders and mentions(last, ["order id", "order number", "which order"]):
        return "It's " + " and ".join(orders) + "."
    if mentions(last, ["reason", "why"]) and any(r["kind"] == "cancel" for r in reqs):
        return "The reason: " + next(r["reason"] for r in reqs if r["kind"] == "cancel") + "."
    return "To be clear: " + " ".join(_restate(r) for r in reqs)


def _restate(r: dict) -> str:
    kind, oid = r["kind"], r.get("order_id")
    if kind == "cancel":
        return f"please cancel order {oid}, reason: {r['reason']}."
    if kind == "order_address":
        return f"please ship order {oid} to {_flat(r['address'])}."
    if kind == "user_address":
        return f"please change my account's default address to {_flat(r['address'])}."
    if kind == "return":
        return f"I want to return {'; '.join(r['items'])} from order {oid}, refund to {r['refund']}."
    if kind == "exchange":
        return (f"I want to exchange the {r['items'][0]} from order {oid} for the same item with {r['want']}; "
                f"use {r['payment']} for any difference.")
    return f"how much did I pay in total for order {oid}?"


GREETING = "Hi! How can I help you today?"


def customer_messages(instruction: str, history: list, replies: list) -> list:
    """The LLM customer's view: the agent's messages are the 'user' side, the customer's own are 'assistant'."""
    msgs = [{"role": "system", "content":
             "You play a customer writing to an online store's support chat. " + instruction + " Write only the "
             "customer's next message, one or two sentences. Do not invent details you were not given. When "
             f"everything you wanted is done, or the agent cannot help, end your message with {STOP}."},
            {"role": "user", "content": GREETING}]
    for mine, agent in zip(replies, history):  # replies[0] answers the greeting, replies[i] history[i - 1]
        msgs += [{"role": "assistant", "content": mine}, {"role": "user", "content": agent}]
    return msgs


# ----------------------------------------------------------------------------------------------------------
# One episode


class RetailSession:
    """The mechanics of one TauGym episode over a private copy of the database. `user` plays "tau.customer"
    through `act(role, messages, **facts)`. talk / call return (observation, reward, done); the reward is paid
    once, when the episode ends (the customer stops or the agent transfers to a human)."""

    def __init__(self, task: dict, user):
        if db_fingerprint(task["db_seed"]) != task["db_sha"]:
            raise ValueError(f"tau task {task['id']} was written for a different database (fingerprint "
                             f"{task['db_sha']}, this code makes {db_fingerprint(task['db_seed'])}); "
                             "regenerate the tasks with python -m gyms.tau")
        self.task, self.user, self.world = task, user, RetailWorld(fresh_db(task["db_seed"]))
        self.agent_messages, self.replies, self.tools_shown = [], [], False
        self.calls = []  # (tool name, arguments) of every call that succeeded

    def opening(self) -> str:
        return self._customer()

    def _customer(self) -> str:
        msgs = customer_messages(self.task["instruction"], self.agent_messages, self.replies)
        text = self.user.act("tau.customer", msgs, rule=customer_rule, customer=self.task["customer"],
                             history=list(self.agent_messages))
        self.replies.append(text)
        return text

    def tools(self, query: str):
        query = query.strip().lower()
        if query == "help":
            return HELP, 0.0, False
        if query != "tools":  # exactly, as the original
            return 'Search takes "tools" (the list of tools) or "help" (how to play) only.', 0.0, False
        if self.tools_shown:
            return "The tools were already listed above.", 0.0, False
        self.tools_shown = True
        return tools_text(), 0.0, False

    def talk(self, message: str):
        self.agent_messages.append(message)
        reply = self._customer()
        if STOP in reply:
            return reply.replace(STOP, "").strip(), self.reward(), True
        return reply, 0.0, False

    def call(self, content: str):
        try:
            name, args = parse_tool_call(content)
        except ValueError as e:
            return f"Error: {e}", 0.0, False
        out = self.world.call(name, args)
        if not out.startswith("Error"):
            self.calls.append((name, args))
            if name == "transfer_to_human_agents":
                return out, self.reward(), True
        return out, 0.0, False

    def reward(self) -> float:
        return reward(self.world.db, self.task, self.agent_messages)


# ----------------------------------------------------------------------------------------------------------
# The gym

PROMPT = """You are a customer-support agent of an online store, chatting with a customer. Help them with their request using the store's tools, and follow the store's policy.

Call interact_with_env with one of these choices:
- search: the content "tools" lists the tools and their arguments (once is enough).
- action: send the customer a message.
- answer: call one tool on the store's database, written as JSON: {{"name": "<tool>", "arguments": {{...}}}}. You see what it returns; a wrong call returns an error message.
The store's policy:
- Before you look at or change an account or its orders, identify the customer by their email, or by their first name, last name and zip code, and find their user id with a tool.
- Act only on that customer's own account and orders.
- Before any change (cancelling, a new address, a return or an exchange), tell the customer exactly what you are about to do and wait for their yes.
- When the customer asks for information, such as an amount, tell it to them in a message.
- Transfer the customer to a human agent only when the tools cannot handle the request.
The conversation ends when the customer is satisfied or is transferred. You succeed when the store's records end up exactly as the customer wanted and they were told what they asked for.""" + FOOTER

YES = "Yes, please go ahead."


def tool_json(name: str, **arguments) -> str:
    return json.dumps({"name": name, "arguments": arguments})


class TauGym(Env):
    name = "tau"
    choices = ("search", "action", "answer")
    fields = {"id": str, "db_seed": int, "db_sha": str, "instruction": str, "customer": dict, "actions": list,
              "outputs": list}
    system_prompt = PROMPT

    def __init__(self, task, user=None, **kwargs):
        super().__init__(task, user, **kwargs)
        self.session = RetailSession(task, self.user)

    @classmethod
    def check_task(cls, task):
        super().check_task(task)
        if db_fingerprint(task["db_seed"]) != task["db_sha"]:
            raise ValueError(f"field 'db_sha': written for a different database (fingerprint {task['db_sha']}, "
                             f"this code makes {db_fingerprint(task['db_seed'])}); regenerate the tasks with "
                             "python -m gyms.tau")
        keys = ("identify_by", "email", "first_name", "last_name", "zip", "requests")
        missing = [k for k in keys if k not in task["customer"]]
        if missing:
            raise ValueError(f"field 'customer': missing {', '.join(missing)}")

    def opening(self):
        self.session = RetailSession(self.task, self.user)
        return self.session.opening()  # the customer speaks first

    def act(self, choice, content):
        s = self.session
        return {"search": s.tools, "action": s.talk, "answer": s.call}[choice](content)

    @classmethod
    def load_original(cls, data_dir, split):
        raise TaskDataError(
            "tau: the original TauGym tasks (tau-bench records {id, obs, info.task{user_id, actions, instruction, "
            "outputs}}) refer to tau-bench's own retail and airline databases and tool implementations, which this "
            "project does not have; they cannot be loaded from data_dir. Use this project's tasks (data/tau), or "
            "tau-bench itself.")

    def expert_action(self, rng):
        """Identify the customer, look up what a careful agent would, confirm each change with the customer before
        the tool call that makes it (the task's own expected calls), then report what was done and every value
        asked for. Full reward: 1."""
        if self.plan is None:
            self.plan = {"turns": self._expert_script(rng), "next": 0}
        if self.plan["next"] < len(self.plan["turns"]):
            self.plan["next"] += 1
            return self.plan["turns"][self.plan["next"] - 1]
        return expert_turn("The request is handled; check whether they need anything else.", "action",
                           "Is there anything else I can help you with today?")

    def _expert_script(self, rng) -> list:
        """The whole episode's turns, decided at its start: the customer's facts and the expected calls are known
        to the oracle. Messages to the customer are checked against the scripted customer (`said`), so a
        confirmation never reads as a report and the report ends the conversation."""
        t, c = self.task, self.task["customer"]
        turns, said = [], []

        def message(think, text):
            said.append(text)
            turns.append(expert_turn(think, "action", text))

        def call(think, name, **arguments):
            turns.append(expert_turn(think, "answer", tool_json(name, **arguments)))

        if rng.random() < 0.5:
            turns.append(expert_turn("First, the tools this store gives me.", "search",
                                     rng.choice(["tools", "available tools"])))
        message(rng.choice(["Policy first: I must identify the customer before touching the account.",
                            "I need to verify who I am talking to."]),
                rng.choice(["Could you give me your email, or your name and zip code, so I can verify your identity?",
                            "Happy to help. To look up your account, may I have your email address (or your full "
                            "name and zip code)?",
                            "Sure. First I need to identify you: what is your email, or your name and zip code?"]))
        if c["identify_by"] == "email":
            call("They gave their email; find their user id.", "find_user_id_by_email", email=c["email"])
        else:
            call("They gave their name and zip code; find their user id.", "find_user_id_by_name_zip",
                 first_name=c["first_name"], last_name=c["last_name"], zip=c["zip"])
        if t.get("user_id") and rng.random() < 0.5:
            call("Look at their profile and orders.", "get_user_details", user_id=t["user_id"])
        actions, totals, report = list(t["actions"]), iter(t["outputs"]), []
        for r in c["requests"]:
            oid = r.get("order_id")
            if oid and (r["kind"] == "total" or rng.random() < 0.5):
                call(f"Check order {oid} before anything else.", "get_order_details", order_id=oid)
            if r["kind"] == "total":
                report.append(f"you paid {next(totals)} in total for order {oid}")
                continue
            a = actions.pop(0)
            for text in confirmations(r, rng):
                if customer_rule(c, said + [text]) == YES:
                    break
            message("This changes their records: say exactly what I will do and wait for their yes.", text)
            call("They agreed; make the change.", a["name"], **a["arguments"])
            report.append(DONE_TEXT[r["kind"]].format(oid=oid))
        lead = rng.choice(["All set: ", "Done. ", "Thanks for waiting. "])
        text = "; ".join(report)
        message("Everything is done; tell them what changed and what they asked to know.",
                lead + text[0].upper() + text[1:] + ".")
        return turns


DONE_TEXT = {"cancel": "order {oid} has been cancelled",
             "order_address": "the shipping address of order {oid} has been updated",
             "user_address": "the default address on your account has been updated",
             "return": "the return for order {oid} has been requested",
             "exchange": "the exchange for order {oid} has been requested"}


def confirmations(r: dict, rng) -> list:
    """Ways to put one change of request `r` to the customer before making it, in random order."""
    oid, kind, items = r.get("order_id"), r["kind"], "; ".join(r.get("items", []))
    if kind == "cancel":
        what = f"cancel order {oid} with the reason '{r['reason']}'"
    elif kind == "order_address":
        what = f"ship order {oid} to {_flat(r['address'])}"
    elif kind == "user_address":
        what = f"set the default address on your account to {_flat(r['address'])}"
    elif kind == "return":
        what = f"request the return of {items} from order {oid}, refunded to {r['refund']}"
    else:
        what = (f"exchange the {items} from order {oid} for the one with {r['want']}, settling any difference "
                f"with {r['payment'].replace('my ', 'your ', 1)}")
    forms = [f"To confirm: I will {what}. Shall I proceed?", f"I can {what}. Would you like me to go ahead?",
             f"Here is the change: {what}. Please confirm, yes or no."]
    rng.shuffle(forms)
    return forms


if __name__ == "__main__":
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        text = dumps(generate(split))
        (DATA_DIR / f"{split}.jsonl").write_text(text, encoding="utf-8")
        print(f"{DATA_DIR / split}.jsonl: {SPLITS[split][1]} tasks, {len(text) / 1e6:.2f} MB", file=sys.stderr)
