#!/usr/bin/env python3
"""Generate deterministic sample instruction-tuning data for the LLaMA SFT toolkit.

Regenerate (byte-identical for the same arguments):

    python3 sft_output/make_sample_data.py
    python3 sft_output/make_sample_data.py --output-dir sft_output --num-examples 3000 \
        --golden-size 150 --seed 0 --num-chats 200 --num-sharegpt 100

Writes two JSONL files (one JSON object per line, keys: id, category, instruction,
context, response):

  sft_dataset.jsonl  training rows, categories in roughly equal shares, shuffled
  golden_set.jsonl   held-out evaluation rows, balanced across categories, disjoint
                     from the training rows (no shared entity combination, hence no
                     shared (instruction, context, response) triple)

Categories: closed_qa, classification, information_extraction, rewriting,
summarization, math. Every response is short, terse and fully determined by the
instruction + context (exact span, bare label, compact JSON, rewritten text,
template summary, or a worked answer ending in "#### <integer>").

It also writes two multi-turn chat files, from a random stream of their own (so the two
files above are byte-identical with or without them):

  chat_multiturn.jsonl   conversations in the "messages" schema: {"messages": [{"role":
                         "system"|"user"|"assistant", "content": ...}, ...], "category",
                         "id"}; an optional system turn, 1-4 user/assistant exchanges,
                         always ending with the assistant; later turns act on earlier
                         answers ("Now double it.", "Say that in upper case.")
  sharegpt_sample.jsonl  the same kinds of conversation in the ShareGPT schema:
                         {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}]};
                         no conversation opens with the same user turn as one in
                         chat_multiturn.jsonl

Chat categories: arithmetic, shopping, list_ops, passage_qa, review, dates, names.

Standard library only.
"""
import argparse
import datetime as dt
import json
import os
import random
import tempfile
import unicodedata

# ----------------------------------------------------------------------------- vocabularies
FIRST = ["Maria", "James", "Aisha", "Kenji", "Sofia", "Liam", "Priya", "Mateo", "Chloe", "Omar",
         "Hannah", "Lucas", "Amara", "Noah", "Elena", "Daniel", "Mei", "Samuel", "Fatima", "Oliver",
         "Zara", "Ethan", "Inês", "Gabriel", "Leila", "Tomás", "Nadia", "Arjun", "Freya", "Diego",
         "Yuki", "Isaac", "Camila", "Hugo", "Grace", "Malik", "Anya", "Felix", "Rosa", "Kwame",
         "Julia", "Ravi", "Emma", "Sebastián", "Nora", "Wei", "Ingrid", "Marcus", "Lena", "Tariq",
         "Zoë", "Adrian", "Ayumi", "Victor", "Clara", "Jonas", "Amelia", "Rahul", "Sara", "Mohammed"]
LAST = ["Lopez", "Nguyen", "Okafor", "Sato", "Rossi", "Müller", "Patel", "Kowalski", "Johansson",
        "Haddad", "Fernandes", "O'Brien", "Kim", "Schmidt", "Dubois", "Mensah", "Novak", "Ivanova",
        "García", "Andersen", "Takahashi", "Costa", "Ahmed", "Bennett", "Silva", "Moreau", "Chen",
        "Fischer", "Yilmaz", "Reyes", "Walsh", "Kaur", "Lindqvist", "Petrov", "Tanaka", "Hughes",
        "Romero", "Abara", "Cohen", "Singh", "Park", "Larsen", "Murphy", "Alvarez", "Kovacs",
        "Bianchi", "Osei", "Varga", "Hoffmann", "Castillo"]
CITIES = ["Lisbon", "Toronto", "Nairobi", "Osaka", "Denver", "Melbourne", "Austin", "Lyon", "Kraków",
          "Seattle", "Monterrey", "Rotterdam", "Manchester", "Bangalore", "Cape Town", "Montreal",
          "Valencia", "Gothenburg", "Auckland", "Dublin", "Singapore", "Chicago", "Bogotá", "Porto",
          "Hamburg", "Accra", "Vancouver", "Edinburgh", "Seoul", "Boston", "Milan", "Brisbane",
          "Atlanta", "Tallinn", "Zurich", "Lagos", "Phoenix", "Copenhagen", "São Paulo", "Prague",
          "Calgary", "Leeds", "Marseille", "Kyoto", "Minneapolis", "Helsinki", "Santiago", "Vienna",
          "Pittsburgh", "Adelaide"]
COUNTRIES = ["Kenya", "Ethiopia", "Japan", "Spain", "Brazil", "Norway", "Canada", "Morocco",
             "Uganda", "Mexico", "Italy", "Portugal", "Australia", "Germany", "Ireland", "Eritrea"]
ROOTS = ["Northwind", "Brightline", "Cedarpoint", "Silverleaf", "Bluepeak", "Ironbridge", "Lumen",
         "Redwood", "Harborview", "Stonefield", "Nimbus", "Keystone", "Clearwater", "Solstice",
         "Evergreen", "Meridian", "Pinecrest", "Quantis", "Halcyon", "Vantage", "Tidewater",
         "Brookhaven", "Aurora", "Granite", "Oakhurst", "Crescent", "Ashford", "Westgate", "Zephyr"]
SECTORS = [("Analytics", "data analytics"), ("Logistics", "logistics"), ("Foods", "food"),
           ("Health", "healthcare"), ("Energy", "renewable energy"), ("Robotics", "robotics"),
           ("Bank", "banking"), ("Software", "software"), ("Pharma", "pharmaceutical"),
           ("Motors", "electric vehicle"), ("Telecom", "telecommunications"), ("Retail", "retail"),
           ("Insurance", "insurance"), ("Games", "video game")]
EXEC_TITLES = ["chief financial officer", "chief technology officer", "head of marketing",
               "vice president of sales", "chief operating officer", "general counsel",
               "head of product", "director of engineering", "chief executive officer",
               "head of human resources"]
JOBS = ["data analyst", "nurse", "software engineer", "product designer", "accountant",
        "civil engineer", "teacher", "pharmacist", "marketing manager", "electrician", "architect",
        "sales associate", "paramedic", "graphic designer", "lab technician", "project manager"]
UNIVERSITIES = ["McGill University", "Stanford University", "Kyoto University", "Boston University",
                "Monash University", "Imperial College London", "ETH Zurich", "Trinity College Dublin",
                "Seoul National University", "Duke University", "Leiden University",
                "University College London", "Carnegie Mellon University", "Aalto University"]
FIELDS = ["chemistry", "economics", "mechanical engineering", "computer science", "architecture",
          "biology", "mathematics", "history", "physics", "industrial design"]
PRODUCTS = {  # product type -> aspects that reviews talk about
    "wireless earbuds": ["battery life", "sound quality", "noise cancelling", "fit"],
    "coffee maker": ["brewing speed", "water tank", "build quality", "carafe"],
    "laptop": ["keyboard", "screen", "battery life", "trackpad"],
    "running shoes": ["cushioning", "grip", "sizing", "stitching"],
    "robot vacuum": ["suction", "app", "navigation", "noise level"],
    "backpack": ["zippers", "padding", "pockets", "straps"],
    "air fryer": ["basket", "cleanup", "temperature control", "timer"],
    "smartwatch": ["heart rate sensor", "battery life", "display", "strap"],
    "desk chair": ["lumbar support", "armrests", "assembly", "cushion"],
    "electric kettle": ["boil time", "lid", "handle", "auto shut-off"],
}
PRICE_RANGE = {"wireless earbuds": (49, 299), "coffee maker": (39, 599), "laptop": (499, 2499),
               "running shoes": (69, 219), "robot vacuum": (149, 1199), "backpack": (39, 189),
               "air fryer": (49, 299), "smartwatch": (99, 799), "desk chair": (89, 899),
               "electric kettle": (25, 149)}
POWERED = ["wireless earbuds", "coffee maker", "laptop", "robot vacuum", "air fryer", "smartwatch",
           "electric kettle"]
BRANDS = ["Aero", "Nova", "Kestrel", "Orbit", "Vela", "Pulse", "Atlas", "Lyra", "Echo", "Terra",
          "Zenith", "Halo"]
MODELS = ["X2", "Pro", "Mini", "S7", "Air", "Max", "Lite", "One", "Plus", "Go"]
RESTAURANTS = ["The Golden Olive", "Blue Lantern", "Little Saffron", "Copper Pot", "Casa Verde",
               "The Hungry Fox", "Sakura House", "Marigold Kitchen", "Oak & Ember", "Tandoor Nights"]
CUISINES_DISHES = {"Italian": ["lasagna", "risotto", "margherita pizza"],
                   "Japanese": ["ramen", "salmon teriyaki", "tempura"],
                   "Mexican": ["tacos al pastor", "enchiladas", "guacamole"],
                   "Indian": ["butter chicken", "lamb biryani", "palak paneer"],
                   "Thai": ["pad thai", "green curry", "papaya salad"],
                   "Lebanese": ["falafel plate", "shawarma", "hummus"]}
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
EVENTS = ["Open Data Summit", "Harvest Food Festival", "Jazz by the River", "Green Building Expo",
          "Indie Game Showcase", "Startup Pitch Night", "Urban Cycling Forum", "Spring Book Fair",
          "AI in Healthcare Conference", "Coastal Photography Workshop", "Craft Beer Weekend"]
VENUES = ["Riverside Hall", "the Grand Pavilion", "Harbor Convention Center", "the Central Library",
          "Union Square Theater", "the Old Mill", "Parkside Arena"]
TOPICS = ["the Q3 budget", "our partnership proposal", "the data migration project",
          "your recent quote", "the warehouse expansion", "next year's marketing plan",
          "the vendor contract renewal", "the new onboarding process"]
LIST_ITEMS = {"cities": CITIES, "tools": ["Slack", "Jira", "Figma", "Notion", "GitHub", "Zoom",
              "Trello", "Excel", "Asana", "Miro"],
              "fruits": ["apples", "bananas", "mangoes", "grapes", "pears", "cherries", "kiwis",
                         "plums", "oranges", "peaches"],
              "languages": ["English", "Spanish", "French", "German", "Japanese", "Portuguese",
                            "Korean", "Italian", "Arabic", "Hindi"]}
LIST_TEMPLATES = {"cities": ["The shortlisted cities are {L}.", "Our next tour stops in {L}.",
                             "The company has offices in {L}."],
                  "tools": ["Our team uses {L} every day.", "The onboarding guide covers {L}.",
                            "New hires get accounts for {L}."],
                  "fruits": ["For the picnic we need {L}.", "The market stall sells {L}.",
                             "The smoothie recipe calls for {L}."],
                  "languages": ["The app is available in {L}.", "Our support team speaks {L}.",
                                "The course is taught in {L}."]}

# ----------------------------------------------------------------------------- helpers
def rand_date(rng, lo=2019, hi=2026):
    start = dt.date(lo, 1, 1).toordinal()
    return dt.date.fromordinal(start + rng.randrange(dt.date(hi, 12, 31).toordinal() - start + 1))


def ordinal(n):
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def fmt_date(d, style):
    """Human-written date; style 0 ("March 5, 2024") is the canonical prose form."""
    m = MONTHS[d.month - 1]
    return [f"{m} {d.day}, {d.year}", f"{d.day} {m} {d.year}", f"{m[:3]} {d.day}, {d.year}",
            f"{m} {ordinal(d.day)}, {d.year}", f"the {ordinal(d.day)} of {m}, {d.year}",
            f"{WEEKDAYS[d.weekday()]}, {m} {d.day}, {d.year}"][style]


def person(rng):
    first, last = rng.choice(FIRST), rng.choice(LAST)
    return first, last, f"{first} {last}"


def company(rng):
    suffix, industry = rng.choice(SECTORS)
    return f"{rng.choice(ROOTS)} {suffix}", industry


def maker(rng):
    """A consumer-hardware company (plausible maker of the PRODUCTS)."""
    return f"{rng.choice(ROOTS)} {rng.choice(['Electronics', 'Devices', 'Home', 'Labs', 'Gear'])}"


def article(word):
    return "an" if word[0].lower() in "aeiou" else "a"


def product(rng, types=None):
    ptype = rng.choice(types or sorted(PRODUCTS))
    return ptype, f"{rng.choice(BRANDS)} {rng.choice(MODELS)}"


def ascii_slug(text):
    """'Inês' -> 'ines', "O'Brien" -> 'obrien' (for e-mail addresses and usernames)."""
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "".join(ch for ch in plain.lower() if ch.isalnum())


def jdump(obj):
    return json.dumps(obj, ensure_ascii=False)


def row(instruction, context, response, key):
    return {"instruction": instruction, "context": context, "response": response, "key": key}

# ----------------------------------------------------------------------------- closed_qa
QA_SUFFIX = ["Answer with the exact words from the passage.",
             "Reply with only the answer, copied from the text.",
             "Give just the short answer, not a full sentence.",
             "Respond with the answer span only."]


def gen_closed_qa(rng, i):
    kind = ["appointment", "biography", "launch", "marathon"][i % 4]
    if kind == "appointment":
        (comp, industry), (first, last, full) = company(rng), person(rng)
        comp2 = company(rng)[0]
        while comp2 == comp:
            comp2 = company(rng)[0]
        city, title, d = rng.choice(CITIES), rng.choice(EXEC_TITLES), rand_date(rng)
        years, staff = rng.randint(2, 19), rng.randrange(120, 25000, 10)
        ctx = (f"{comp}, {article(industry)} {industry} company based in {city}, announced on {fmt_date(d, 0)} that "
               f"{full} will join as its new {title}. {last} previously spent {years} years at "
               f"{comp2}. The company employs about {staff:,} people.")
        qa = [([f"Who will join {comp} as its new {title}?", f"Who is the new {title} of {comp}?",
                f"Name the person {comp} hired as {title}."], full),
              ([f"Where is {comp} based?", f"In which city is {comp} headquartered?"], city),
              ([f"Where did {last} work before joining {comp}?",
                f"Which company did {last} previously work for?"], comp2),
              ([f"How many years did {last} spend at {comp2}?"], str(years)),
              ([f"About how many people does {comp} employ?",
                f"How many employees does {comp} have?"], f"{staff:,}"),
              (["In what year was the announcement made?"], str(d.year))]
        key = (kind, comp, full)
    elif kind == "biography":
        first, last, full = person(rng)
        city, city2 = rng.sample(CITIES, 2)
        year = rng.randint(1950, 1990)
        year2 = year + rng.randint(22, 30)
        comp, uni, field = company(rng)[0], rng.choice(UNIVERSITIES), rng.choice(FIELDS)
        ctx = (f"{full} was born in {city} in {year}. {last} studied {field} at {uni} and founded "
               f"{comp} in {year2}. Today {last} lives in {city2}.")
        qa = [([f"Where was {full} born?", f"In which city was {last} born?"], city),
              ([f"In what year was {full} born?", f"When was {last} born?"], str(year)),
              ([f"What did {last} study?", f"Which subject did {full} study?"], field),
              ([f"Where did {last} study?", f"Which university did {full} attend?"], uni),
              ([f"Which company did {full} found?", f"What company did {last} start?"], comp),
              ([f"In what year did {last} found {comp}?", f"When was {comp} founded?"], str(year2)),
              ([f"Where does {last} live today?", f"In which city does {full} live now?"], city2)]
        key = (kind, full, comp)
    elif kind == "launch":
        comp, (ptype, name), lead = maker(rng), product(rng), person(rng)[2]
        lo, hi = PRICE_RANGE[ptype]
        price, countries, d = rng.randrange(lo, hi + 1, 10), rng.randint(3, 60), rand_date(rng)
        ctx = (f"{comp} launched the {name} {ptype} on {fmt_date(d, 0)}. The {name} sells for "
               f"${price:,} and is available in {countries} countries. The design team was led by {lead}.")
        qa = [([f"How much does the {name} cost?", f"What is the price of the {name}?"], f"${price:,}"),
              ([f"In how many countries is the {name} available?"], str(countries)),
              ([f"Who led the design team for the {name}?", "Who led the design team?"], lead),
              ([f"Which company launched the {name}?", f"Who makes the {name}?"], comp),
              ([f"What type of product is the {name}?", f"What kind of device is the {name}?"], ptype)]
        key = (kind, comp, name, ptype)
    else:
        d, city, country = rand_date(rng), rng.choice(CITIES), rng.choice(COUNTRIES)
        win, second = person(rng)[2], person(rng)[2]
        while second == win:
            second = person(rng)[2]
        time, runners = f"2:{rng.randint(4, 19):02d}:{rng.randint(0, 59):02d}", rng.randrange(3000, 45000, 100)
        ctx = (f"The {d.year} {city} Marathon was held on {fmt_date(d, 0)}. {win} of {country} won "
               f"the race in {time}, ahead of {second}. More than {runners:,} runners took part.")
        qa = [([f"Who won the {d.year} {city} Marathon?", "Who won the race?"], win),
              (["Who finished second?", f"Who came second in the {city} Marathon?"], second),
              (["What was the winning time?", f"How long did it take {win} to finish?"], time),
              ([f"Which country is {win} from?", "What country does the winner represent?"], country),
              (["How many runners took part?", "More than how many runners took part?"], f"{runners:,}")]
        key = (kind, d.year, city, win)
    questions, answer = rng.choice(qa)
    q, sfx = rng.choice(questions), rng.choice(QA_SUFFIX)
    instr = rng.choice([f"{q} {sfx}", f"Read the passage and answer the question. {q} {sfx}",
                        f"Using only the passage below, answer: {q} {sfx}"])
    assert answer in ctx, (answer, ctx)
    return row(instr, ctx, answer, key)

# ----------------------------------------------------------------------------- classification
REVIEW = {  # (product review sentences, restaurant review sentences); first of each is the opener
    "positive": (["I've been using the {name} {ptype} for {dur} and I love it.",
                  "The {aspect} is excellent, better than I expected.",
                  "Honestly the best {ptype} I've owned.", "Setup took five minutes and it just works.",
                  "It feels really well made.", "Worth every penny.", "I would happily buy it again.",
                  "Five stars from me."],
                 ["We had dinner at {rest} in {city} last {day} and it was wonderful.",
                  "The {dish} was perfectly cooked.", "Our server was friendly and attentive.",
                  "Great atmosphere and fair prices.", "We're already planning our next visit.",
                  "Best {cuisine} food I've had in a long time."]),
    "negative": (["I've had the {name} {ptype} for {dur} and I regret buying it.",
                  "The {aspect} is terrible and got worse after a week.",
                  "Customer support never answered my emails.", "Completely overpriced for what you get.",
                  "I'm returning it.", "Avoid this one.", "One star, very disappointed.",
                  "It feels flimsy and cheaply made."],
                 ["We had dinner at {rest} in {city} last {day} and it was a letdown.",
                  "The {dish} arrived cold and bland.", "We waited 45 minutes for our food.",
                  "The staff were rude when we asked about our order.",
                  "Way too expensive for the portion sizes.", "We won't be going back."]),
    "neutral": (["I've used the {name} {ptype} for {dur}.",
                 "The {aspect} is okay, about what you'd expect at this price.",
                 "It does the job, nothing more and nothing less.", "Neither great nor terrible.",
                 "Pretty average overall.", "Three stars.",
                 "It works as described, although nothing stands out.",
                 "No complaints, but no surprises either."],
                ["We had dinner at {rest} in {city} last {day}.",
                 "The {dish} was fine, nothing memorable.", "Service was neither fast nor slow.",
                 "Prices are about average for the area.", "It's an okay option if you're nearby.",
                 "Decent {cuisine} food, but nothing special."]),
}
SENTIMENT_INSTR = ["Classify the sentiment of this review as positive, negative, or neutral. "
                   "Answer with the label only.",
                   "What is the sentiment of the following review? Choose one of: positive, "
                   "negative, neutral. Reply with just the label.",
                   "Label the review below as positive, negative or neutral. Respond with one "
                   "lowercase word.",
                   "Is this customer review positive, negative, or neutral? Output only the label."]
TICKETS = {
    "billing": ["I was charged twice for my {plan} plan this month. Please refund the extra ${amt}.",
                "Why does my latest invoice show ${amt} when my {plan} plan costs less?",
                "I canceled my subscription on {date} but my card was still billed.",
                "Can you send me a receipt for invoice #{num}? I need it for my expenses.",
                "My payment of ${amt} failed, but the money still left my bank account.",
                "How do I switch my {plan} plan from monthly to annual billing?"],
    "technical": ["The app crashes every time I open the {feature} screen on my {device}.",
                  "I keep getting error code {code} when I try to sync my files.",
                  "Since the last update, the {feature} page won't load on my {device}.",
                  "The desktop app freezes whenever I export a report.",
                  "Notifications stopped working on my {device} after the update.",
                  "Uploads fail at 99% with a timeout error."],
    "account": ["I forgot my password and the reset link says it has expired.",
                "Please change the email address on my account to {email}.",
                "How do I delete my account and all of my data?",
                "I'm locked out of my account after too many login attempts.",
                "Can I change my username from {user} to something else?",
                "I need to update the name on my profile to {full}."],
    "shipping": ["My order #{num} still hasn't arrived. Tracking has shown it stuck in {city} since {date}.",
                 "The package was delivered to the wrong address.",
                 "Can I change the delivery address for order #{num}? I'm moving to {city}.",
                 "My parcel arrived with a crushed box and the {ptype} inside is damaged.",
                 "How long does express delivery to {city} usually take?",
                 "The courier marked order #{num} as delivered, but nothing was at my door."],
}
TICKET_INSTR = ["Route this support ticket to one of these teams: billing, technical, account, "
                "shipping. Answer with the team name only.",
                "Which department should handle the message below? Options: billing, technical, "
                "account, shipping. Reply with one word.",
                "Classify the customer message into exactly one category (billing, technical, "
                "account, shipping). Output only the category.",
                "Assign a queue to this ticket. Allowed labels: billing, technical, account, "
                "shipping. Respond with the bare label."]


def gen_classification(rng, i):
    kind = ["product_review", "restaurant_review", "ticket", "ticket"][i % 4]
    j = (i // 4) * 2 + i % 2  # index among rows of the same task -> labels cycle evenly
    first, last, full = person(rng)
    if kind == "ticket":
        label = sorted(TICKETS)[j % len(TICKETS)]
        slots = dict(plan=rng.choice(["Basic", "Plus", "Premium", "Team", "Business"]),
                     amt=rng.choice([9, 12, 19, 29, 49, 99, 149]), num=rng.randint(10000, 99999),
                     date=fmt_date(rand_date(rng, 2023, 2025), rng.choice([0, 1, 2])),
                     feature=rng.choice(["reports", "calendar", "settings", "dashboard", "messages"]),
                     device=rng.choice(["iPhone 14", "Pixel 8", "Galaxy S23", "iPad", "Windows laptop", "MacBook"]),
                     code=rng.choice(["E102", "E404", "SYNC-17", "0x80070005", "ERR-503"]),
                     email=f"{ascii_slug(first)}.{ascii_slug(last)}@example.com",
                     user=f"{ascii_slug(first)}{rng.randint(10, 99)}", full=full,
                     city=rng.choice(CITIES), ptype=product(rng)[0])
        body = rng.choice(TICKETS[label]).format(**slots)
        greet = rng.choice(["Hi,", "Hello,", "Hi support team,", "Good morning,", ""])
        sign = rng.choice([f"Thanks, {first}", f"Regards, {full}", "Thank you.", ""])
        ctx = " ".join(p for p in (greet, body, sign) if p)
        instr = rng.choice(TICKET_INSTR)
    else:
        label = ["positive", "negative", "neutral"][j % 3]
        prod_pool, rest_pool = REVIEW[label]
        pool = prod_pool if kind == "product_review" else rest_pool
        ptype, name = product(rng)
        cuisine = rng.choice(sorted(CUISINES_DISHES))
        slots = dict(ptype=ptype, name=name, aspect=rng.choice(PRODUCTS[ptype]),
                     dur=rng.choice(["two weeks", "a month", "three months", "half a year", "a year"]),
                     rest=rng.choice(RESTAURANTS), city=rng.choice(CITIES), cuisine=cuisine,
                     dish=rng.choice(CUISINES_DISHES[cuisine]), day=rng.choice(WEEKDAYS))
        ctx = " ".join(s.format(**slots) for s in [pool[0]] + rng.sample(pool[1:], 2))
        instr = rng.choice(SENTIMENT_INSTR)
    return row(instr, ctx, label, (kind, ctx))

# ----------------------------------------------------------------------------- information_extraction
IE_TAIL = [" Return compact single-line JSON with keys {keys} in that order.",
           " Output only a JSON object with the keys {keys}, in this order.",
           " Answer with JSON only, using the keys {keys}."]


def gen_extraction(rng, i):
    kind = ["email", "event", "profile", "order"][i % 4]
    first, last, full = person(rng)
    d = rand_date(rng, 2023, 2026)
    dtext = fmt_date(d, rng.randrange(6)) if rng.random() < 0.9 else d.isoformat()
    if kind == "email":
        comp, title, topic = company(rng)[0], rng.choice(EXEC_TITLES), rng.choice(TOPICS)
        ctx = (f"Hi {rng.choice(FIRST)}, this is {full}, {title} at {comp}. Could we set up a call "
               f"about {topic} on {dtext}? Let me know if that works. Best, {first}")
        ans = {"name": full, "company": comp, "date": d.isoformat()}
        lead = rng.choice(["Extract the sender's name, company and proposed meeting date from the email "
                           "(date as YYYY-MM-DD).",
                           "From this email, pull out who wrote it, their company, and the date they "
                           "suggest, with the date in YYYY-MM-DD format."])
        key = (kind, full, comp)
    elif kind == "event":
        event, venue, city = rng.choice(EVENTS), rng.choice(VENUES), rng.choice(CITIES)
        price, hour = rng.randrange(10, 150, 5), rng.randint(9, 19)
        ctx = (f"Join us for the {event} at {venue} in {city} on {dtext}! Doors open at "
               f"{(hour - 1) % 12 + 1} {'AM' if hour < 12 else 'PM'}. Tickets cost ${price} and are "
               f"on sale now. Questions? Contact {full}.")
        ans = {"event": event, "city": city, "date": d.isoformat(), "price": price}
        lead = rng.choice(["Extract the event name, city, date (YYYY-MM-DD) and ticket price in "
                           "dollars (a number) from this notice.",
                           "Pull the event details out of the announcement below: event name, city, "
                           "ISO date and price as an integer."])
        key = (kind, event, city, d.isoformat())
    elif kind == "profile":
        job, city, comp, age = rng.choice(JOBS), rng.choice(CITIES), company(rng)[0], rng.randint(22, 64)
        since = d.year - rng.randint(1, min(age - 21, 15))
        ctx = rng.choice([f"{full}, {age}, is {article(job)} {job} from {city}. {last} has worked at {comp} since {since}.",
                          f"Meet {full}: a {age}-year-old {job} based in {city} who joined {comp} in {since}.",
                          f"Our employee of the month is {full} ({age}), {article(job)} {job} at the {city} office of {comp}."])
        ans = {"name": full, "age": age, "job_title": job, "city": city}
        lead = rng.choice(["Extract the person's name, age (a number), job title and city.",
                           "Read the short bio and extract name, age as an integer, job title and city."])
        key = (kind, full, job, city)
    else:
        ptype, pname = product(rng)
        oid = f"{rng.choice(['NW', 'BX', 'QT', 'LM', 'ZR'])}-{rng.randint(10000, 99999)}"
        qty, store = rng.randint(1, 5), rng.choice(ROOTS) + " Store"
        ctx = (f"Thank you for shopping with {store}, {first}! Your order {oid} for {qty} x {pname} "
               f"{ptype} has shipped and should arrive in {rng.choice(CITIES)} by {dtext}.")
        ans = {"order_id": oid, "quantity": qty, "product": f"{pname} {ptype}",
               "delivery_date": d.isoformat()}
        lead = rng.choice(["Extract the order ID, quantity (a number), product name and expected "
                           "delivery date (YYYY-MM-DD) from this message.",
                           "From the shipping confirmation, extract order ID, quantity as an integer, "
                           "product and delivery date in ISO format."])
        key = (kind, oid)
    keys = ", ".join(f'"{k}"' for k in ans)
    return row(lead + rng.choice(IE_TAIL).format(keys=keys), ctx, jdump(ans), key)

# ----------------------------------------------------------------------------- rewriting
DATE_SENTENCES = ["The contract was signed on {d}.", "Our office will be closed on {d}.",
                  "{full} started at {comp} on {d}.", "The package is expected to arrive on {d}.",
                  "Payment is due by {d}.", "The conference begins on {d} in {city}.",
                  "{full} will fly to {city} on {d}.", "The new {ptype} goes on sale on {d}."]
AMOUNT_SENTENCES = ["The invoice total came to {a}.", "We raised {a} at the charity auction.",
                    "{full} was reimbursed {a} for travel.", "The repair will cost {a}.",
                    "{comp} agreed to pay {a} in damages.", "The renovation budget for the {city} office is {a}."]


def amount_text(rng, dollars, cents):
    c = f".{cents:02d}" if cents else ""
    forms = [f"${dollars:,}{c}", f"USD {dollars}{c}", f"{dollars:,}{c} US dollars", f"US${dollars:,}{c}",
             f"{dollars} dollars" + (f" and {cents} cent{'s' if cents != 1 else ''}" if cents else "")]
    return rng.choice(forms)


def gen_rewriting(rng, i):
    kind = ["date", "list", "amount", "name"][i % 4]
    first, last, full = person(rng)
    slots = dict(full=full, comp=company(rng)[0], city=rng.choice(CITIES), ptype=product(rng)[0])
    if kind == "date":
        d, tpl = rand_date(rng), rng.choice(DATE_SENTENCES)
        ctx, ans = tpl.format(d=fmt_date(d, rng.randrange(6)), **slots), tpl.format(d=d.isoformat(), **slots)
        instr = rng.choice(["Rewrite the sentence so the date is in ISO format (YYYY-MM-DD). Keep "
                            "everything else the same and output only the sentence.",
                            "Convert the date in this sentence to YYYY-MM-DD. Return just the rewritten sentence.",
                            "Normalize the date below to ISO 8601 (YYYY-MM-DD), changing nothing else."])
        key = (kind, ctx)
    elif kind == "list":
        group = rng.choice(sorted(LIST_ITEMS))
        items = rng.sample(LIST_ITEMS[group], rng.randint(3, 5))
        joined = ", ".join(items[:-1]) + rng.choice([" and ", ", and "]) + items[-1]
        ctx, ans = rng.choice(LIST_TEMPLATES[group]).format(L=joined), ", ".join(items)
        instr = rng.choice(["Turn the items listed in this sentence into a comma-separated list. "
                            "Output only the list.",
                            "Extract the list from the sentence and write it as comma-separated "
                            "values, in the original order.",
                            "Rewrite the sentence as a plain comma-separated list of its items."])
        key = (kind, ctx)
    elif kind == "amount":
        dollars = rng.choice([rng.randint(5, 99), rng.randint(100, 9999), rng.randint(10000, 999999)])
        cents = 0 if rng.random() < 0.5 else rng.randint(1, 99)
        ctx = rng.choice(AMOUNT_SENTENCES).format(a=amount_text(rng, dollars, cents), **slots)
        ans = f"USD {dollars:,}.{cents:02d}"
        instr = rng.choice(['Rewrite the amount in this sentence in the normalized form "USD 1,234.56". '
                            "Output only the amount.",
                            "Normalize the money amount below to the format USD #,###.## and return "
                            "just that amount.",
                            "Extract the amount and write it as USD with thousands separators and two "
                            "decimals (e.g. USD 1,250.00)."])
        key = (kind, ctx)
    else:
        people = [(first, last)] + [person(rng)[:2] for _ in range(rng.choice([0, 0, 1, 2]))]
        ctx = "; ".join(f"{f} {l}" for f, l in people)
        ans = "; ".join(f"{l.upper()}, {f}" for f, l in people)
        instr = rng.choice(['Rewrite each name as "LAST, First" with the surname in capitals. Keep '
                            "the names separated by semicolons.",
                            "Format the name(s) for a reference list: SURNAME in upper case, a comma, "
                            "then the first name. Use semicolons between names.",
                            'Convert every "First Last" name below to "LAST, First". Output only the '
                            "converted names, separated by semicolons."])
        key = (kind, ctx)
    return row(instr, ctx, ans, key)

# ----------------------------------------------------------------------------- summarization
SUM_INSTR = ["Summarize the passage in one sentence.", "Write a one-sentence summary of the text below.",
             "Give a single-sentence summary of this news item.", "TL;DR in one sentence:",
             "Condense the following report into one short sentence."]


def gen_summarization(rng, i):
    kind = ["earnings", "appointment", "recall", "storm", "expansion"][i % 5]
    (comp, industry), (_first, last, full) = company(rng), person(rng)
    if kind == "recall":
        comp, (ptype, name) = maker(rng), product(rng, POWERED)
    if kind == "earnings":
        q, year = rng.choice(["first", "second", "third", "fourth"]), rng.randint(2019, 2026)
        rev, pct, up = f"{rng.randint(120, 9999) / 10:.1f}", rng.randint(2, 35), rng.random() < 0.6
        ctx = (f"{comp} published its results for the {q} quarter of {year} on "
               f"{rng.choice(WEEKDAYS[:5])}. Revenue {'rose' if up else 'fell'} {pct}% to ${rev} "
               f"million. Chief executive {full} said the company {'expects further growth' if up else 'is cutting costs'} "
               f"next year. Shares {'rose' if up else 'fell'} {rng.randint(1, 9)}% in early trading.")
        ans = f"{comp} reported {q}-quarter {year} revenue of ${rev} million, {'up' if up else 'down'} {pct}%."
        key = (kind, comp, q, year)
    elif kind == "appointment":
        title, comp2, d = rng.choice(EXEC_TITLES), company(rng)[0], fmt_date(rand_date(rng), 0)
        while comp2 == comp:
            comp2 = company(rng)[0]
        ctx = (f"{comp} has appointed {full} as its new {title}. {last} joins after {rng.randint(3, 20)} "
               f"years at {comp2}. The appointment takes effect on {d}. {comp} did not disclose the "
               f"terms of the agreement.")
        ans = f"{comp} appointed {full} as its new {title}, effective {d}."
        key = (kind, comp, full)
    elif kind == "recall":
        units = f"{rng.randrange(2000, 900000, 500):,}"
        part, risk = rng.choice([("battery", "overheating"), ("power cable", "electric shocks"),
                                 ("charger", "fires"), ("hinge", "injuries"), ("switch", "short circuits")])
        m1 = rng.randrange(10)
        ctx = (f"{comp} is recalling {units} {name} {ptype} units sold between {MONTHS[m1]} and "
               f"{MONTHS[m1 + 2]} {rng.randint(2019, 2026)}. The company said a faulty {part} can cause "
               f"{risk}. Customers can return the product to any store for a full refund. No injuries "
               f"have been reported so far.")
        ans = f"{comp} is recalling {units} {name} {ptype} units because a faulty {part} can cause {risk}."
        key = (kind, comp, name, ptype)
    elif kind == "storm":
        city, mm, flights = rng.choice(CITIES), rng.randint(40, 220), rng.randint(12, 400)
        w = rng.randrange(7)
        ctx = (f"A powerful storm brought {mm} millimetres of rain to {city} on {WEEKDAYS[w]}. Schools "
               f"were closed and {flights} flights were cancelled at the city's airport. Officials "
               f"expect conditions to improve by {WEEKDAYS[(w + 2) % 7]}.")
        ans = f"A storm dropped {mm} mm of rain on {city}, closing schools and cancelling {flights} flights."
        key = (kind, city, mm, flights)
    else:
        city, jobs, d = rng.choice(CITIES), rng.randrange(50, 2000, 10), rand_date(rng)
        when = f"{MONTHS[d.month - 1]} {d.year}"
        ctx = (f"{comp}, the {industry} group, will open a new office in {city} in {when}. The site "
               f"will create {jobs:,} jobs over the next three years. {full}, who will lead the office, "
               f"said the city's talent pool was a key reason for the move.")
        ans = f"{comp} will open a new {city} office in {when}, creating {jobs:,} jobs."
        key = (kind, comp, city)
    return row(rng.choice(SUM_INSTR), ctx, ans, key)

# ----------------------------------------------------------------------------- math (GSM8K style)
MATH_INSTR = ["Solve the word problem. Show the steps briefly and end with a line '#### <answer>'.",
              "Work out the answer step by step, then give the final number on its own line after '####'.",
              "Answer this math problem. Keep the working short; the last line must be '#### ' followed "
              "by the number.",
              "Solve step by step. Write one short line per step and finish with '#### ' and the answer.",
              "Calculate the answer. Give brief working, then the final integer after '####'."]
ITEMS = [("notebooks", 2, 6), ("sandwiches", 4, 9), ("movie tickets", 8, 15), ("coffees", 3, 6),
         ("paintbrushes", 2, 5), ("bags of apples", 3, 7), ("comic books", 4, 12)]


def gen_math(rng, i):
    kind = i % 8
    name = rng.choice(FIRST)
    if kind == 0:
        item, lo, hi = rng.choice(ITEMS)
        n, p = rng.randint(2, 6), rng.randint(lo, hi)
        cost = n * p
        bill = min(b for b in (20, 50, 100) if b > cost)
        ans = bill - cost
        q = (f"{name} buys {n} {item} for ${p} each and pays with a ${bill} bill. How much change "
             f"does {name} get, in dollars?")
        steps = [f"The {item} cost {n} * ${p} = ${cost}.", f"The change is ${bill} - ${cost} = ${ans}."]
    elif kind == 1:
        goods = rng.choice(["loaves of bread", "croissants", "muffins", "bagels"])
        r, h = rng.randint(12, 60), rng.randint(3, 9)
        total = r * h
        sold = rng.randint(total // 3, total - 1)
        ans = total - sold
        q = (f"A bakery in {rng.choice(CITIES)} bakes {r} {goods} every hour for {h} hours. By closing "
             f"time it has sold {sold} of them. How many {goods} are left?")
        steps = [f"The bakery bakes {r} * {h} = {total} {goods}.", f"It has {total} - {sold} = {ans} left."]
    elif kind == 2:
        k, ans = rng.randint(2, 6), rng.randint(3, 15)
        total = k * ans
        x = rng.randint(2, total - 2)
        q = (f"{name} has {x} stickers and buys {total - x} more. {name} then shares all of them "
             f"equally among {k} friends. How many stickers does each friend get?")
        steps = [f"{name} has {x} + {total - x} = {total} stickers.", f"Each friend gets {total} / {k} = {ans}."]
    elif kind == 3:
        p, d, n = 20 * rng.randint(2, 15), rng.choice([10, 20, 25, 50]), rng.randint(2, 4)
        disc = p * d // 100
        ans = n * (p - disc)
        thing = rng.choice(["jacket", "lamp", "pair of boots", "backpack", "board game"])
        q = (f"A {thing} normally costs ${p}. This week the store takes {d}% off the price. How much "
             f"does {name} pay for {n} of them?")
        steps = [f"The discount is {p} * {d} / 100 = ${disc}.", f"Each one costs ${p} - ${disc} = ${p - disc}.",
                 f"For {n} of them: {n} * ${p - disc} = ${ans}."]
    elif kind == 4:
        a, days = rng.randint(8, 40), rng.randint(3, 12)
        read = a * days
        pages = read + rng.randint(10, 200)
        ans = pages - read
        q = (f"{name}'s book has {pages} pages. {name} reads {a} pages a day for {days} days. How many "
             f"pages are left to read?")
        steps = [f"{name} reads {a} * {days} = {read} pages.", f"Pages left: {pages} - {read} = {ans}."]
    elif kind == 5:
        w, h, s = rng.randint(12, 30), rng.randint(4, 8), rng.randint(2, 6)
        wh = 5 * h
        ans = (wh + s) * w
        q = (f"{name} earns ${w} an hour. This week {name} worked {h} hours each day from Monday to "
             f"Friday and {s} hours on Saturday. How much did {name} earn this week, in dollars?")
        steps = [f"Weekday hours: 5 * {h} = {wh}.", f"Total hours: {wh} + {s} = {wh + s}.",
                 f"Earnings: {wh + s} * ${w} = ${ans}."]
    elif kind == 6:
        n, k, p = rng.randint(10, 30), rng.randint(2, 8), rng.randint(2, 10)
        t = n * k
        rev = t * p
        e = rng.randint(rev // 5, rev - 1)
        ans = rev - e
        q = (f"Each of the {n} students in a class sells {k} raffle tickets at ${p} each. The class "
             f"spent ${e} on prizes. How much money is left after paying for the prizes?")
        steps = [f"Tickets sold: {n} * {k} = {t}.", f"Money collected: {t} * ${p} = ${rev}.",
                 f"After prizes: ${rev} - ${e} = ${ans}."]
    else:
        v1, t1, v2, t2 = rng.randint(30, 70), rng.randint(2, 5), rng.randint(30, 70), rng.randint(2, 4)
        d1, d2 = v1 * t1, v2 * t2
        ans = d1 + d2
        q = (f"{name} drives at {v1} miles per hour for {t1} hours, then at {v2} miles per hour for "
             f"{t2} hours. How many miles does {name} drive in total?")
        steps = [f"First part: {v1} * {t1} = {d1} miles.", f"Second part: {v2} * {t2} = {d2} miles.",
                 f"Total: {d1} + {d2} = {ans} miles."]
    assert ans > 0
    return row(rng.choice(MATH_INSTR), q, "\n".join(steps + [f"#### {ans}"]), ("math", q))

# ----------------------------------------------------------------------------- multi-turn chats
# Conversations whose later user turns refer to earlier answers ("now double it", "say that in
# upper case"). Every assistant turn is terse and fully determined by the conversation so far.
CHAT_SYSTEMS = ["You are a concise assistant. Answer with the result only.",
                "You are a helpful assistant. Keep every answer as short as possible.",
                "Answer tersely. No explanations.",
                "You are a careful assistant that follows formatting instructions exactly."]
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
        "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(x):
    """0..99 in English words: 42 -> 'forty-two'."""
    if x < 20:
        return ONES[x]
    tens, ones = divmod(x, 10)
    return TENS[tens] + (f"-{ONES[ones]}" if ones else "")


def arith_followups(rng, x, last):
    """(question, new value) pairs that act on the previous answer x."""
    k = rng.randint(2, 9)
    opts = [("Now double it.", 2 * x), (f"Add {k} to that.", x + k),
            (f"Now add {k}.", x + k)]
    if x * k < 5000:
        opts.append((f"Multiply that by {k}.", x * k))
    if x > k:
        opts += [(f"Subtract {k} from it.", x - k), (f"Now take away {k}.", x - k)]
    if x % 2 == 0:
        opts.append(("Now halve it.", x // 2))
    if last and x < 100:
        opts.append(("Say that number in words.", number_words(x)))
    if last:
        opts.append(("Is that number even or odd? One word.", "even" if x % 2 == 0 else "odd"))
    return opts


def chat_arith(rng, n):
    if rng.random() < 0.6:
        a, b = rng.randint(3, 60), rng.randint(2, 40)
        x, expr = a + b, f"{a} + {b}"
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        x, expr = a * b, f"{a} * {b}"
    first = rng.choice([f"What is {expr}?", f"Compute {expr}.", f"Calculate {expr}. Reply with "
                        "the number only.", f"What does {expr} equal?"])
    steps = [(first, str(x))]
    while len(steps) < n:
        q, x = rng.choice(arith_followups(rng, x, len(steps) == n - 1))
        steps.append((q, str(x)))
    return steps


def chat_shopping(rng, n):
    name, (item, lo, hi) = rng.choice(FIRST), rng.choice(ITEMS)
    k, m, p = rng.randint(2, 6), rng.randint(1, 3), rng.randint(lo, hi)
    total, total2 = k * p, (k + m) * p
    bill = min(b for b in (20, 50, 100, 200) if b > total2)
    change = bill - total2
    if change % 2 == 0:
        fourth = ("Split that change equally between 2 friends. How much does each get?",
                  str(change // 2))
    else:
        fourth = ("Is that change more than $10? Answer yes or no.", "yes" if change > 10 else "no")
    steps = [(f"{name} buys {k} {item} at ${p} each. What is the total cost in dollars?", str(total)),
             (rng.choice([f"{name} then buys {m} more at the same price. What is the new total?",
                          f"Add {m} more {item} to the order. New total in dollars?"]), str(total2)),
             (f"How much change does {name} get from a ${bill} bill?", str(change)), fourth]
    return steps[:n]


def alpha_key(text):
    """Dictionary order, accents folded: "Müller" sorts before "Murphy"."""
    return ascii_slug(text), text


def list_followups(items, last):
    """(question, answer, new list) triples that act on the current list."""
    opts = [("Sort them alphabetically.", None, sorted(items, key=alpha_key)),
            ("Reverse the order.", None, items[::-1])]
    if len(items) > 2:
        opts += [("Remove the last one.", None, items[:-1]), ("Drop the first one.", None, items[1:])]
    if last:
        opts += [("Which one comes first now?", items[0], items),
                 ("How many are there now?", str(len(items)), items),
                 ("Say the last one in upper case.", items[-1].upper(), items)]
    return opts


def chat_list(rng, n):
    group = rng.choice(sorted(LIST_ITEMS))
    items = rng.sample(LIST_ITEMS[group], rng.randint(3, 5))
    first = rng.choice([f"Here are some {group}: {', '.join(items)}. How many are there?",
                        f"Count the items in this list: {', '.join(items)}."])
    steps = [(first, str(len(items)))]
    while len(steps) < n:
        q, ans, items = rng.choice(list_followups(items, len(steps) == n - 1))
        steps.append((q, ans if ans is not None else ", ".join(items)))
    return steps


def chat_passage(rng, n):
    first, last, full = person(rng)
    city, city2 = rng.sample(CITIES, 2)
    year, field, uni = rng.randint(1950, 1995), rng.choice(FIELDS), rng.choice(UNIVERSITIES)
    ctx = (f"{full} was born in {city} in {year}. {last} studied {field} at {uni} and now lives "
           f"in {city2}.")
    third = rng.choice([(f"What did {last} study?", field), (f"Where does {last} live now?", city2),
                        (f"Which university did {first} attend?", uni)])
    steps = [(rng.choice([f"Read this: {ctx}\n\nWhere was {first} born?",
                          f"{ctx}\n\nIn which city was {last} born? Answer with the city only."]), city),
             (rng.choice(["And in what year?", "In which year was that?"]), str(year)), third,
             ('Now give the birth city and year as JSON with the keys "city" and "year".',
              jdump({"city": city, "year": year}))]
    return steps[:n]


def chat_review(rng, n):
    label = rng.choice(["positive", "negative", "neutral"])
    pool = REVIEW[label][0]
    ptype, name = product(rng)
    slots = dict(ptype=ptype, name=name, aspect=rng.choice(PRODUCTS[ptype]),
                 dur=rng.choice(["two weeks", "a month", "three months", "half a year", "a year"]))
    ctx = " ".join(s.format(**slots) for s in [pool[0]] + rng.sample(pool[1:], 2))
    steps = [(f"Classify the sentiment of this review as positive, negative or neutral.\n\n{ctx}",
              label),
             (rng.choice(["Say that in upper case.", "Repeat the label in capital letters."]),
              label.upper()),
             ("Which product is the review about?", f"{name} {ptype}"),
             ("Give the label as a number: 1 for positive, 0 for neutral, -1 for negative.",
              {"positive": "1", "neutral": "0", "negative": "-1"}[label])]
    return steps[:n]


def chat_date(rng, n):
    d = rand_date(rng)
    steps = [(rng.choice([f"Convert {fmt_date(d, rng.randrange(6))} to ISO format (YYYY-MM-DD).",
                          f"Write {fmt_date(d, rng.randrange(6))} as YYYY-MM-DD."]), d.isoformat())]
    while len(steps) < n:
        k = rng.randint(1, 30)
        days = f"{k} day" + ("s" if k > 1 else "")
        later, earlier = d + dt.timedelta(days=k), d - dt.timedelta(days=k)
        q, ans, d = rng.choice([
            (f"Add {days} to it. Give the ISO date.", later.isoformat(), later),
            (f"What date is {days} earlier? Use ISO format.", earlier.isoformat(), earlier),
            ("What day of the week is that?", WEEKDAYS[d.weekday()], d),
            ("Which month is that in? One word.", MONTHS[d.month - 1], d),
            ("Now write it as DD/MM/YYYY.", f"{d.day:02d}/{d.month:02d}/{d.year}", d)])
        steps.append((q, ans))
    return steps


def chat_names(rng, n):
    people, count = [], rng.choice([1, 2, 2, 3])
    while len(people) < count:
        p = person(rng)
        if p[1] not in {q[1] for q in people}:
            people.append(p)
    fulls = "; ".join(full for _, _, full in people)
    lead = ('Rewrite this name as "LAST, First": ' if len(people) == 1 else
            'Rewrite these names as "LAST, First", separated by semicolons: ')
    steps = [(lead + fulls, "; ".join(f"{last.upper()}, {first}" for first, last, _ in people)),
             ("Now give only the initials, like M.L., separated by semicolons.",
              "; ".join(f"{first[0]}.{last[0]}." for first, last, _ in people)),
             ("How many people is that?", str(len(people))),
             ("Which surname comes first alphabetically?",
              min((last for _, last, _ in people), key=alpha_key))]
    return steps[:n]


CHAT_GENERATORS = [("arithmetic", "arith", chat_arith), ("shopping", "shop", chat_shopping),
                   ("list_ops", "list", chat_list), ("passage_qa", "qa", chat_passage),
                   ("review", "rev", chat_review), ("dates", "date", chat_date),
                   ("names", "name", chat_names)]


def build_chats(rng, total, id_fmt, seen):
    """`total` conversations (1-4 exchanges, about 40% with a system turn) whose first user turn
    is not in `seen` (which is updated), categories in turn, then shuffled."""
    rows = []
    for j in range(total):
        cat, prefix, gen = CHAT_GENERATORS[j % len(CHAT_GENERATORS)]
        for _attempt in range(1000):
            steps = gen(rng, rng.choice([1, 2, 2, 3, 3, 4, 4]))
            if steps[0][0] not in seen:
                break
        else:
            raise RuntimeError(f"could not generate enough unique {cat} conversations")
        seen.add(steps[0][0])
        messages = []
        if rng.random() < 0.4:
            messages.append({"role": "system", "content": rng.choice(CHAT_SYSTEMS)})
        for user, assistant in steps:
            messages += [{"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}]
        rows.append({"messages": messages, "category": cat,
                     "id": id_fmt.format(prefix=prefix, n=j)})
    rng.shuffle(rows)
    return rows


SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


def to_sharegpt(row):
    return {"conversations": [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]}
                              for m in row["messages"]]}


def check_chat(messages):
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    assert body and body == ["user", "assistant"] * (len(body) // 2), roles
    assert all(isinstance(m["content"], str) and m["content"].strip() for m in messages), messages

# ----------------------------------------------------------------------------- assembly
CATEGORIES = [("closed_qa", "cqa", gen_closed_qa), ("classification", "cls", gen_classification),
              ("information_extraction", "ie", gen_extraction), ("rewriting", "rw", gen_rewriting),
              ("summarization", "sum", gen_summarization), ("math", "math", gen_math)]


def split_counts(total, k):
    return [total // k + (1 if j < total % k else 0) for j in range(k)]


def build(rng, total, id_fmt, banned_keys, banned_triples):
    """Generate `total` rows, balanced across categories, avoiding banned keys/triples."""
    rows, keys, triples = [], set(), set()
    for (cat, prefix, gen), count in zip(CATEGORIES, split_counts(total, len(CATEGORIES))):
        made, attempts = 0, 0
        while made < count:
            attempts += 1
            if attempts > 50 * count + 1000:
                raise RuntimeError(f"could not generate enough unique {cat} rows")
            r = gen(rng, made)
            trip = (r["instruction"], r["context"], r["response"])
            k = (cat,) + tuple(r.pop("key"))
            if k in banned_keys or k in keys or trip in banned_triples or trip in triples:
                continue
            keys.add(k)
            triples.add(trip)
            rows.append({"id": id_fmt.format(prefix=prefix, n=made), "category": cat, **r})
            made += 1
    return rows, keys, triples


def write_jsonl_atomic(path, rows):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output-dir", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--num-examples", type=int, default=3000)
    ap.add_argument("--golden-size", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-chats", type=int, default=200)
    ap.add_argument("--num-sharegpt", type=int, default=100)
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    # Golden set first; the training set then avoids every golden entity combination.
    golden, gkeys, gtriples = build(rng, args.golden_size, "golden-{prefix}-{n:03d}", set(), set())
    data, _, dtriples = build(rng, args.num_examples, "{prefix}-{n:05d}", gkeys, gtriples)
    rng.shuffle(data)

    assert not gtriples & dtriples, "golden set overlaps the training set"
    ids = [r["id"] for r in golden + data]
    assert len(ids) == len(set(ids)), "duplicate ids"
    for r in golden + data:
        assert list(r) == ["id", "category", "instruction", "context", "response"], r
        assert r["response"].strip() and r["instruction"].strip(), r

    os.makedirs(args.output_dir, exist_ok=True)
    write_jsonl_atomic(os.path.join(args.output_dir, "sft_dataset.jsonl"), data)
    write_jsonl_atomic(os.path.join(args.output_dir, "golden_set.jsonl"), golden)
    print(f"wrote {len(data)} rows to sft_dataset.jsonl and {len(golden)} rows to golden_set.jsonl "
          f"in {args.output_dir}")
    write_chats(args)


def write_chats(args):
    """The multi-turn files, from their own random stream (the rows above are unaffected)."""
    chat_rng, seen = random.Random(f"multi-turn chats {args.seed}"), set()
    chats = build_chats(chat_rng, args.num_chats, "chat-{prefix}-{n:03d}", seen)
    shared = [to_sharegpt(r) for r in build_chats(chat_rng, args.num_sharegpt, "{prefix}-{n}", seen)]

    firsts = [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in chats]
    firsts += [next(t["value"] for t in r["conversations"] if t["from"] == "human") for r in shared]
    assert len(firsts) == len(set(firsts)), "a conversation opens the same way twice"
    assert len({r["id"] for r in chats}) == len(chats), "duplicate ids"
    for r in chats:
        assert list(r) == ["messages", "category", "id"], r
        check_chat(r["messages"])

    write_jsonl_atomic(os.path.join(args.output_dir, "chat_multiturn.jsonl"), chats)
    write_jsonl_atomic(os.path.join(args.output_dir, "sharegpt_sample.jsonl"), shared)
    print(f"wrote {len(chats)} conversations to chat_multiturn.jsonl and {len(shared)} to "
          f"sharegpt_sample.jsonl in {args.output_dir}")


if __name__ == "__main__":
    main()
